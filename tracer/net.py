"""TCP loss episodes: retransmits of one flow close together become one stall.

An episode covers the time the application waited: from the first transmission
of the lost data to the acknowledgement of its last retransmit. The first
transmission is :func:`first_tx_lead` before the first retransmit; the acknowledgement comes about one smoothed RTT
after the last retransmit. A retransmit joins the open episode of its flow
when the data it resends was first sent before that episode ended (so a
long outage with backed-off RTOs is one episode, while a new loss after the
application computed for a while is another). Episodes are emitted once no
retransmit came for ``max(gap_ns, 2 * RTO)``, so a ``net`` event appears that
long after the flow recovers.
"""

from __future__ import annotations

import gzip
import platform

import numpy as np

from ..wire.schema import ENUMS, OP_NAMES
from .decode import TCP_STATES

#: the op names decode gives the three kinds of _retrans record (bpf/tcp.bpf.c)
RETRANSMIT_SYNACK = OP_NAMES[ENUMS["SS_OP_RETRANS_SYNACK"]]
RETRANSMIT_CLOSE = OP_NAMES[ENUMS["SS_OP_RETRANS_CLOSE"]]

CA_OPEN = 0                 # icsk_ca_state: no loss seen yet
TIME_LOSS_PROBE = 5         # icsk_pending while a tail loss probe is sent (ICSK_TIME_LOSS_PROBE)
TIMER_FIRED = 0             # icsk_pending inside the RTO handler (cleared before it retransmits)
RTO_MIN_NS = 200_000_000    # TCP_RTO_MIN
JOIN_SLACK_NS = 20_000_000


def first_tx_lead(op: str, ca_state: int, pending: int, rto_ns: int, srtt_ns: int,
                  packets_out: int = 0, jiffy_ns: int = 4_000_000) -> int:
    """How long before a retransmit its data was first sent, by what triggered it.

    The RTO timer (icsk_pending already cleared) and SYN-ACKs: one RTO. A tail loss probe
    (the loss-probe timer, state Open): its timeout, two RTTs plus two jiffies, or plus the
    minimum RTO for a lone segment in flight, never more than the RTO (Linux's
    tcp_schedule_loss_probe). Anything ACK-driven (fast retransmit, RACK, retransmits
    clocked out after an RTO): about two RTTs.
    """
    if op == RETRANSMIT_SYNACK or pending == TIMER_FIRED:
        return rto_ns
    if pending == TIME_LOSS_PROBE and ca_state == CA_OPEN:
        pto = 2 * srtt_ns + (RTO_MIN_NS if packets_out == 1 else 2 * jiffy_ns)
        return min(rto_ns, pto) if rto_ns else pto
    return 2 * srtt_ns


def _lead(r: dict, i: int, rto_ns: int, srtt_ns: int, hz: int) -> int:
    if "pending" not in r:          # records without the trigger: assume a timeout
        return rto_ns
    return first_tx_lead(r["op"][i], int(r["ca_state"][i]), int(r["pending"][i]), rto_ns, srtt_ns,
                         int(r["packets_out"][i]) if "packets_out" in r else 0, 1_000_000_000 // hz)


def kernel_hz(release: str | None = None) -> int:
    """CONFIG_HZ of the running kernel (icsk_rto is in jiffies); 250 if unknown."""
    release = release or platform.release()
    for path in (f"/boot/config-{release}", "/proc/config.gz"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=")[1])
        except OSError:
            continue
    return 250


class EpisodeBuilder:
    def __init__(self, owners, gap_ns: int = 1_000_000_000, hz: int | None = None, keep=None):
        self.owners = owners          # SocketOwners
        self.keep = keep              # pid -> bool, asked once its owner is known (--cgroup)
        self.gap_ns = gap_ns
        self.hz = hz or kernel_hz()
        self.open = {}                # flow key -> episode dict
        self.total_retransmits = 0
        self._closed = []
        self.failed = 0          # sends that failed (still counted by the kernel)
        self.untraced = 0        # counted from total_retrans without a tracepoint hit
        self.last_total = {}     # socket -> (its inode, its total_retrans) at the last record

    def add(self, r: dict):
        """Feed the ``_retrans`` table from decode.split().

        A flow's count is the growth of the socket's own total_retrans counter
        (what TcpRetransSegs also counts), so an increment the tracepoint did
        not show is still counted by the next record of that socket, or by its
        close record. A socket is its address *and* its inode: a freed socket's
        address is soon reused, and if its close record was lost (a full ring) the
        new socket must not continue the old one's counter. (The inode turns 0
        once the process closed its fd; it never changes to another nonzero one.)
        A successful retransmit stands for at least its own segments; a failed one (the
        tracepoint reports those since Linux 6.10) for the counter's growth only.
        """
        order = np.argsort(r["ts_ns"], kind="stable")
        for i in order:
            op = r["op"][i]
            sk = int(r["sk"][i])
            total = int(r["total"][i])
            key = (sk, r["saddr"][i], int(r["sport"][i]), r["daddr"][i], int(r["dport"][i]))
            ts = int(r["ts_ns"][i])
            ino = int(r["sock_ino"][i])
            if op == RETRANSMIT_CLOSE:
                prev = self._prev(self.last_total.pop(sk, None), ino)
                delta = total - prev if prev is not None and total > prev else 0
                if delta:
                    self.untraced += delta
                    ep = self.open.get(key)
                    if ep is None:       # after the flow's last episode: a short one of its own
                        ep = self._new(key, r, i, ts)
                    ep["n"] += delta
                continue
            if op == RETRANSMIT_SYNACK:
                count = 1
            else:
                last = self.last_total.get(sk)
                prev = self._prev(last, ino)
                segs = int(r["segs"][i]) or 1
                grew = total - prev if prev is not None and total >= prev else None
                self.last_total[sk] = (ino or (last[0] if last is not None and prev is not None else 0), total)
                if int(r["err"][i]) != 0:
                    # a failed send (6.10+): counted by the kernel only if it failed after
                    # the counter was bumped, which the counter's growth tells
                    self.failed += 1
                    count = grew or 0
                else:
                    count = grew if grew is not None and grew >= segs else segs
                    if count > segs:
                        self.untraced += count - segs
                if count == 0:
                    continue
            self.total_retransmits += count
            rto_ns = int(r["rto_jiffies"][i]) * 1_000_000_000 // self.hz
            ep = self.open.get(key)
            if ep is not None:
                # the same wait if this data was first sent before the last retransmit was acked
                lead = _lead(r, i, rto_ns, int(r["srtt_us"][i]) * 1000 if "srtt_us" in r else 0, self.hz)
                # (slack: timers fire on jiffies, late by a tick or more under load)
                if ts - lead > ep["last"] + ep["srtt_ns"] + max(JOIN_SLACK_NS, lead // 4):
                    self._close(key)
                    ep = None
            if ep is None:
                ep = self._new(key, r, i, ts)
            ep["last"] = ts
            ep["srtt_ns"] = int(r["srtt_us"][i]) * 1000 if "srtt_us" in r else ep["srtt_ns"]
            ep["n"] += count
            ep["rto_ns"] = rto_ns or ep["rto_ns"]
            if not ep["ino"] and ino:
                # the episode began before the socket had an inode (an accepted socket before
                # accept() returned, or its first records raced the graft): learned now
                ep["ino"] = ino
            if not ep["pid"]:
                self._resolve(ep, r, i)
        return self

    @staticmethod
    def _prev(last, ino: int):
        """The socket's total_retrans at its last record, or None if ``last`` (inode, total)
        was another socket at the same address (both inodes known and different)."""
        if last is None:
            return None
        old_ino, total = last
        return None if old_ino and ino and old_ino != ino else total

    def _new(self, key, r, i, ts):
        ino = int(r["sock_ino"][i])
        rto_ns = int(r["rto_jiffies"][i]) * 1_000_000_000 // self.hz
        srtt_ns = int(r["srtt_us"][i]) * 1000 if "srtt_us" in r else 0
        lead = _lead(r, i, rto_ns, srtt_ns, self.hz)
        ep = self.open[key] = {"first": ts, "start": ts - lead, "last": ts, "n": 0, "rto_ns": rto_ns,
                               "srtt_ns": srtt_ns, "ino": ino, "asked": self.owners.scans, "pid": 0,
                               "comm": "",
                               "state": TCP_STATES.get(int(r["state"][i]), str(int(r["state"][i])))}
        self._resolve(ep, r, i)
        return ep

    def _resolve(self, ep, r, i):
        """The episode's owner: the one the kernel noted at connect() or accept() (bpf/tcp.bpf.c),
        known even when the socket left every fd table (closed, its process exited) before
        /proc could be searched for it; else the process holding the socket's inode."""
        if "owner_pid" in r and int(r["owner_pid"][i]):
            ep["pid"] = int(r["owner_pid"][i])
            ep["comm"] = str(r["owner_comm"][i])
        elif ep["ino"]:
            ep["asked"] = self.owners.scans
            ep["pid"] = self.owners.owner(ep["ino"])
        ep["keep"] = self._keep(ep["pid"])

    def _keep(self, pid) -> bool:
        """Whether an episode of ``pid`` is this tracer's (decided while its owner lives)."""
        return True if self.keep is None else bool(pid) and bool(self.keep(int(pid)))

    def _close(self, key):
        ep = self.open.pop(key)
        ep["key"] = key
        self._closed.append(ep)

    def _owner_settled(self, ep) -> bool:
        """Look up a closed episode's owner again if it is unknown; True once it is known or a
        scan begun after the episode's last lookup missed it too.

        Its socket may not have been in /proc when the episode began: made since the last
        scan, which is rate limited (a scan of /proc/*/fd costs milliseconds on a busy node),
        so a miss is only final once a scan that started after the record was read (so after
        the socket existed) did not find it either. Until then the episode waits; a flush
        a scan interval later settles it."""
        if ep["pid"] or not ep["ino"]:
            return True
        ep["pid"] = self.owners.owner(ep["ino"])
        ep["keep"] = self._keep(ep["pid"])
        return bool(ep["pid"]) or self.owners.scans > ep["asked"]

    def waiting(self):
        """Episodes whose rows are still to come: open, or closed with their owner unsettled."""
        return list(self.open.values()) + self._closed

    def flush(self, now_ns: int, force: bool = False, proc_comm=lambda pid: "") -> dict:
        """Close episodes idle for longer than the gap (all if force); return a ``net`` table
        of those whose owner is settled (all if force)."""
        for key, ep in list(self.open.items()):
            if force or now_ns - ep["last"] > max(self.gap_ns, 2 * ep["rto_ns"]):
                self._close(key)
        settled = [self._owner_settled(ep) or force for ep in self._closed]
        closed = [ep for ep, done in zip(self._closed, settled) if done and ep.get("keep", True)]
        self._closed = [ep for ep, done in zip(self._closed, settled) if not done]
        if not closed:
            return {}
        cols = {c: [] for c in ("ts_ns", "dur_ns", "pid", "tid", "comm", "op", "saddr", "sport",
                                "daddr", "dport", "state", "retransmits", "sock_ino")}
        for ep in closed:
            _sk, saddr, sport, daddr, dport = ep["key"]
            cols["ts_ns"].append(ep["start"])
            cols["dur_ns"].append(ep["last"] + ep["srtt_ns"] - ep["start"])
            cols["pid"].append(ep["pid"])
            cols["tid"].append(0)
            cols["comm"].append((proc_comm(ep["pid"]) or ep.get("comm", "")) if ep["pid"] else "")
            cols["op"].append("retransmit")
            cols["saddr"].append(saddr)
            cols["sport"].append(sport)
            cols["daddr"].append(daddr)
            cols["dport"].append(dport)
            cols["state"].append(ep["state"])
            cols["retransmits"].append(ep["n"])
            cols["sock_ino"].append(ep["ino"])
        out = {}
        for c, v in cols.items():
            if c in ("comm", "op", "saddr", "daddr", "state"):
                out[c] = np.array(v, dtype=object)
            else:
                out[c] = np.array(v, dtype=np.uint64)
        return out

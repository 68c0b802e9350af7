"""CPU time of the GPUs' processes: the "cpu" table.

A GPU can go idle with nothing blocked at all: its process computes on the CPU (Python-side
preprocessing, metrics, a CPU-bound augmentation, serializing a checkpoint), or its DataLoader
workers are all busy decoding while it waits for them in a queue. No stall probe sees that,
so the analysis needs the processes' CPU time: every ``period`` the sampler reads the user +
system time of each owner process (the GPUs' processes and their descendants) from
``/proc/<pid>/stat`` (the whole thread group's, in clock ticks) and sends it as a running
total; the analysis takes the difference across an idle interval (``verdict.cpu_bound``).

Which processes: those NVML lists on a GPU that a poll found mostly idle in the last second
(tracer/agent.py; the analysis reads CPU time inside idle intervals only, so while every GPU
computes nothing is read), and their descendants from the kernel's
``/proc/<pid>/task/<tid>/children`` lists (re-read every ``children_s``).

The same pass also notes, in the "wait" table, each of those processes whose main thread is
asleep in a receive on a TCP socket (``/proc/<pid>/syscall``: read, readv, recv*; or poll and
ppoll on that one socket, as Python's socket timeouts wait, or on it and wakeup channels, as
libcurl's loop does; or an epoll whose set, read from its ``fdinfo``, holds that connection
besides such channels, as an asyncio client's (a main thread's; in a process no GPU lists,
a helper thread's too: fsspec's loop thread, Go's netpoller); connections that all go to
one host, or all to one port of several hosts (an object store's endpoint, answered by DNS
with several addresses), count as one; the socket's inode
looked up in the process's ``net/tcp`` for the peer): a DataLoader worker streaming its
samples over HTTP or from an object store, the ``curl`` a WebDataset ``pipe:`` shard reads
from (the worker's child), a trainer waiting on a rendezvous store. Nothing blocked in a probe's
sense, so without these rows such an interval is bare "unexplained" (``verdict.net_wait``).
A wait whose far end another of those processes holds (a loopback connection to a logging or
tracking service the trainer started) is not a wait on the network and is left out. Only
main threads, and a helper thread while the main thread waits on it (a futex) or sleeps: a
thread pool fetching over the network (``CpuSampler._wait``).

Cost (bench/tracer_bench.py ``cpu_sampler``): while GPUs idle, two small reads per sleeping
process per period (stat and syscall, about 10 us each), plus the thread scans of a process
whose main thread waits on one of its threads; 72 processes (8 GPUs, 8 workers each, all
asleep), each trainer with 32 sleeping threads and its main thread waiting on one, at the
250 ms default measured 1.46-1.86% of a core on this 2-core machine (two runs, 2026-11-30;
session 14 measured 1.71-1.84% against 1.35-1.46% for the code without thread scans). The
period bounds what can be judged: an interval needs two samples inside it, a third of its
length apart (``verdict.CPU_SPAN``).
"""

from __future__ import annotations

import os
import platform
import socket
import struct
import time

import numpy as np

from .procinfo import socket_inodes, stat_fields

TICK_NS = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def read_cpu_ns(pid: int, proc: str = "/proc"):
    """User + system time of process ``pid`` (all its threads) in ns, or None if it is gone."""
    got = read_cpu(pid, proc)
    return None if got is None else got[1]


def read_cpu(pid: int, proc: str = "/proc"):
    """(comm, user + system ns, state, threads) of process ``pid`` (all its threads; the state
    letter its main thread's), or None if it is gone: the name it has now (a DataLoader worker
    renames itself after the fork)."""
    st = stat_fields(pid, proc)
    if st is None:
        return None
    comm, rest = st
    try:
        # utime, stime (fields 14, 15), num_threads (20)
        return comm, (int(rest[11]) + int(rest[12])) * TICK_NS, rest[0], int(rest[17])
    except (IndexError, ValueError):
        return None


#: receives whose first argument is the fd, and polls (fds array, nfds), by syscall number
_RECV = {"x86_64": {0: "read", 19: "readv", 45: "recvfrom", 47: "recvmsg", 299: "recvmmsg"},
         "aarch64": {63: "read", 65: "readv", 207: "recvfrom", 212: "recvmsg", 243: "recvmmsg"}}
_POLL = {"x86_64": {7: "poll", 271: "ppoll"}, "aarch64": {73: "ppoll"}}
#: waits on another thread of the process (a lock, a condition, a queue: futex) or on time (a
#: sleep loop that polls for a result): where a helper thread may be the one on the network
_INNER = {"x86_64": {202, 35, 230}, "aarch64": {98, 101, 115}}
#: epoll waits (epoll_wait, epoll_pwait, epoll_pwait2), counted for a main thread only
_EPOLL = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}}
#: the most fds of a poll read for a wait on one TCP peer (each is a readlink): a loop over
#: more (NCCL's proxy, a server) waits there whether or not anyone waits on it
MAX_POLL_FDS = 8
#: the most files of an epoll set read for one (its fdinfo names each one's inode: no
#: readlink): a client's pool of connections to its object store (boto3's and aiobotocore's
#: default pool is 10) with the loop's own channels
MAX_EPOLL_FILES = 64
#: threads of one process read per scan (a PyTorch trainer has an OpenMP pool per core)
MAX_THREADS = 256
#: a process whose thread scans keep finding nothing is scanned 2**k times less often, k <= this
MAX_BACKOFF = 4


def _peer(hex_addr: str) -> str:
    """``0100007F:1F90`` (/proc/net/tcp: 32-bit words in host order) -> ``127.0.0.1:8080``;
    IPv6 as ``[::1]:8080`` (v4-mapped addresses as IPv4)."""
    a, port = hex_addr.split(":")
    raw = b"".join(struct.pack("=I", int(a[i:i + 8], 16)) for i in range(0, len(a), 8))
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        raw = raw[12:]
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}:{int(port, 16)}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


class TcpPeers:
    """Established TCP sockets of a process's network namespace, from ``<pid>/net/tcp`` and
    ``tcp6``: inode -> peer address, and the socket at the other end of a connection inside
    the namespace (loopback). A namespace's tables are read again on a miss, at most once per
    ``refresh_s``; an inode that a fresh read did not list (a UNIX socket, one still
    connecting) does not cause another read for ``negative_s`` (a process asleep on a UNIX
    socket would otherwise have a busy node's tables parsed every second)."""

    def __init__(self, proc: str = "/proc", refresh_s: float = 1.0, negative_s: float = 10.0):
        self.proc = proc
        self.refresh_s = refresh_s
        self.negative_s = negative_s
        self._missed: dict = {}         # socket inode -> when a fresh read did not list it
        # netns inode -> (read at, {inode: (local, remote)}, {(local, remote): inode}) (hex)
        self._by_ns: dict = {}
        self.reads = 0

    def _tables(self, pid: int, ino: int) -> tuple:
        try:
            ns = os.stat(f"{self.proc}/{pid}/ns/net").st_ino
        except OSError:
            ns = 0
        got = self._by_ns.get(ns, (-1e18, {}, {}, set()))
        now = time.monotonic()
        if ino not in got[1] and ino not in got[3] and now - got[0] >= self.refresh_s \
                and now - self._missed.get(ino, -1e18) >= self.negative_s:
            socks, ends, listening = {}, {}, set()
            for name in ("tcp", "tcp6"):
                try:
                    with open(f"{self.proc}/{pid}/net/{name}") as f:
                        next(f, None)
                        for line in f:
                            x = line.split()
                            if len(x) > 9 and x[3] == "01":        # ESTABLISHED
                                socks[int(x[9])] = (x[1], x[2])
                                ends[(x[1], x[2])] = int(x[9])
                            elif len(x) > 9 and x[3] == "0A":      # LISTEN
                                listening.add(int(x[9]))
                except (OSError, ValueError):
                    continue
            self.reads += 1
            got = self._by_ns[ns] = (now, socks, ends, listening)
            if ino not in socks:
                if len(self._missed) > 4096:
                    self._missed.clear()
                self._missed[ino] = now
        return got

    def one_peer(self, pid: int, inos):
        """(inode, ``ip:port``) of the one established TCP connection among the sockets
        ``inos`` of process ``pid`` (a receive's socket, or a poll's set with its wakeup
        channels), or None when there is none, a listening socket among them (a server
        waiting for its clients), or connections to more than one service. Several
        connections count as one wait when they all go to one host (a client's pool of
        connections to its object store: the first is named) or all to one port of
        several hosts (one service behind several addresses: an object store's endpoint
        that DNS answers with a different address per connection, as S3's does; named
        ``ip:port (+k more hosts)``). Connections to different ports of different hosts
        (a collective's peers, a crawler) are not one wait."""
        found, hosts, ports = None, set(), set()
        for ino in inos:
            tables = self._tables(pid, ino)
            if ino in tables[3]:
                return None
            got = tables[1].get(ino)
            if got is None:
                continue
            host, _, port = got[1].rpartition(":")
            hosts.add(host)
            ports.add(port)
            if found is None:
                found = (ino, _peer(got[1]))
        if found is None or (len(hosts) > 1 and len(ports) > 1):
            return None
        if len(hosts) > 1:
            k = len(hosts) - 1
            return found[0], f"{found[1]} (+{k} more host{'s' if k > 1 else ''})"
        return found

    def other_end(self, pid: int, ino: int):
        """The inode of the socket at the other end of ``ino``'s connection when that end is
        in the same namespace (a loopback connection), else None."""
        _at, socks, ends, _listening = self._tables(pid, ino)
        got = socks.get(ino)
        return ends.get((got[1], got[0])) if got else None


def read_wait(pid: int, proc: str = "/proc", peers: "TcpPeers | None" = None, machine: str = ""):
    """(call, peer) when process ``pid``'s main thread is asleep receiving on a TCP socket
    (``call``: the syscall; ``peer``: ``ip:port``), else None (running, not in a receive, or
    on a pipe, a UNIX socket, a file; a poll or epoll over connections to several services:
    ``TcpPeers.one_peer``)."""
    got = _wait_socket(pid, proc, machine, epoll=True)
    if got is None:
        return None
    one = (peers or TcpPeers(proc)).one_peer(pid, got[1])
    return (got[0], one[1]) if one else None


def _syscall(pid: int, proc: str = "/proc", tid: int = 0):
    """The fields of ``/proc/<pid>/syscall`` (of thread ``tid`` if given): [nr, args...,
    sp, pc], or None (gone, running, not in a syscall)."""
    path = f"{proc}/{pid}/task/{tid}/syscall" if tid else f"{proc}/{pid}/syscall"
    try:
        with open(path, "rb") as f:
            x = f.read().split()
        int(x[0])
        return x
    except (OSError, ValueError, IndexError):
        return None


def _wait_socket(pid: int, proc: str = "/proc", machine: str = "", tid: int = 0, x=None,
                 epoll: bool = False):
    """(call, socket inodes) when process ``pid``'s main thread (or thread ``tid``; ``x``: its
    syscall fields if already read) is asleep in a receive on a socket (one inode), or in a
    poll of at most MAX_POLL_FDS fds some of which are sockets (their inodes: the caller
    keeps the wait only if its established TCP connections all go to one service,
    ``TcpPeers.one_peer``; the rest are the wakeup channels an event loop adds, as libcurl's
    socketpair), or, with ``epoll``, in an
    epoll wait whose set holds at most MAX_EPOLL_FILES files (every inode the set watches,
    from its ``fdinfo``: an asyncio loop's self-pipe and its connections), else None."""
    machine = machine or platform.machine()
    x = x if x is not None else _syscall(pid, proc, tid)
    if x is None:
        return None
    nr = int(x[0])
    call = _RECV.get(machine, {}).get(nr)
    base = f"{proc}/{pid}/task/{tid}" if tid else f"{proc}/{pid}"
    try:
        if call:
            fds = [int(x[1], 16)]
        elif _POLL.get(machine, {}).get(nr) and 1 <= int(x[2], 16) <= MAX_POLL_FDS:
            call = _POLL[machine][nr]
            n = int(x[2], 16)
            with open(f"{base}/mem", "rb", buffering=0) as m:     # struct pollfd: int fd, short, short
                m.seek(int(x[1], 16))
                raw = m.read(8 * n)
            fds = [struct.unpack_from("=i", raw, 8 * i)[0] for i in range(n)]
        elif epoll and nr in _EPOLL.get(machine, ()):
            with open(f"{proc}/{pid}/fdinfo/{int(x[1], 16)}", "rb") as f:
                watched = [line for line in f.read().split(b"\n") if line.startswith(b"tfd:")]
            if not watched or len(watched) > MAX_EPOLL_FILES:
                return None
            return "epoll_wait", tuple(int(line.split(b"ino:")[1].split()[0], 16) for line in watched)
        else:
            return None
        inos = []
        for fd in fds:
            if fd < 0:
                continue
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inos.append(int(link[8:-1]))
    except (OSError, ValueError, IndexError, struct.error):
        return None
    return (call, tuple(inos)) if inos else None


def children_of(pids, proc: str = "/proc") -> set:
    """Living descendants of ``pids`` from the kernel's per-thread children lists
    (CONFIG_PROC_CHILDREN; an empty set where the files are absent)."""
    out: set = set()
    todo = [int(p) for p in pids]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"{proc}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"{proc}/{pid}/task/{tid}/children", "rb") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


class CpuSampler:
    """``poll(roots, all_owners)`` -> ``{"cpu": {ts_ns, pid, comm, cpu_ns}}`` (and ``"wait":
    {ts_ns, pid, call, peer}`` for those waiting on a TCP receive) or None: ``roots``
    and their descendants (found through the kernel's children lists, re-read every
    ``children_s`` or when the roots change). Where those lists do not exist
    (CONFIG_PROC_CHILDREN off), ``all_owners()``, when given (the sched family's owner set:
    every GPU's processes and descendants), stands in for the descendants."""

    def __init__(self, proc: str = "/proc", children_s: float = 2.0, thread_scan_s: float = 0.25):
        self.proc = proc
        self.children_s = children_s
        self.thread_scan_s = thread_scan_s
        self.machine = platform.machine()
        self._net_tid: dict = {}        # pid -> its thread last found waiting on the network
        self._scanned: dict = {}        # pid -> (when a scan of its threads last found none, scans in a row)
        self.thread_reads = 0
        self._kids: set = set()
        self._kids_of: frozenset = frozenset()
        self._kids_at = -1e18
        self._kids_gen = None
        self.have_children = None      # whether the kernel has the children lists (once known)
        self.peers = TcpPeers(proc)
        self._family_end: dict = {}     # far-end socket inode -> whether a member holds it

    def owners(self, roots, all_owners=None, generation=None) -> set:
        """``roots`` and their descendants: re-read when the roots change, every
        ``children_s``, and when ``generation`` (the sched family's owners generation, which
        moves when an owner forks or exits) differs from the last pass's: a process a worker
        starts for one shard (``pipe:curl``) is read from the next pass, not seconds later."""
        roots = {int(p) for p in roots if int(p) > 0}
        if self.have_children is None and roots:
            r = next(iter(roots))
            self.have_children = os.path.exists(f"{self.proc}/{r}/task/{r}/children") or \
                not os.path.exists(f"{self.proc}/{r}")
        if self.have_children is False:
            return roots | ({int(p) for p in all_owners()} if all_owners is not None else set())
        now = time.monotonic()
        if frozenset(roots) != self._kids_of or now - self._kids_at >= self.children_s \
                or (generation is not None and generation != self._kids_gen):
            self._kids, self._kids_of, self._kids_at = children_of(roots, self.proc), frozenset(roots), now
            self._kids_gen = generation
        return roots | self._kids

    def _wait(self, pid: int, members: set, threads: int = 2, root: bool = True):
        """(call, peer) of ``pid``'s wait on a TCP peer, unless that peer is another process
        of the same GPU (a loopback connection whose far end a member holds: a logging or
        tracking service the trainer started, waiting on the trainer), else None.

        The main thread's wait, or, while the main thread waits on another thread of its own
        (a futex: a queue, a future, an event) or sleeps (a loop polling for a result), a
        helper thread's: a thread pool fetching samples or shards (boto3's transfers, a
        streaming dataset's downloaders) while the main thread waits for it. Threads are
        read up to MAX_THREADS of them; after a scan that found none, not again for
        ``thread_scan_s`` (one sample period: a helper thread starts its receive a moment
        after the main thread starts waiting), doubling with each such scan in a row up to 16
        times that (a trainer waiting on its pin-memory thread, never on the network, costs a
        scan every 4 s; ``rearm`` ends the backoff when a GPU computes again); the thread
        last found waiting is read first on every pass. Only a receive, a poll of at most
        MAX_POLL_FDS fds or (for the main thread) an epoll of at most MAX_EPOLL_FILES files,
        whose established TCP connections all go to one service (``TcpPeers.one_peer``: one
        host, or one port of several hosts), none a listening socket, counts: a loop over
        many peers (NCCL's proxy), a server, and a GPU process's helper thread in epoll (Gloo's
        loop, a TCPStore's: a main thread waiting on its pin-memory thread would blame
        them) wait there whether or not anyone waits on them.
        ``threads``: the process's (from its stat): one alone has no helper to read.
        ``root``: whether NVML lists it on a GPU; a helper thread's epoll counts only in a
        process that is not (a DataLoader worker's fsspec loop thread, a Go tool such as
        s5cmd that a worker reads a shard from): collective libraries' loops (Gloo's, a
        TCPStore's) run in the GPU's own processes."""
        x = _syscall(pid, self.proc)
        got = self._peer_of(pid, _wait_socket(pid, self.proc, self.machine, x=x, epoll=True), members)
        if got is not None or threads < 2 or x is None or int(x[0]) not in _INNER.get(self.machine, ()):
            return got
        tid = self._net_tid.get(pid)      # kept after a miss: a pool's thread fetches again
        if tid is not None:
            got = self._peer_of(pid, _wait_socket(pid, self.proc, self.machine, tid=tid, epoll=not root), members)
            self.thread_reads += 1
            if got is not None:
                return self._in_thread(pid, tid, got)
        now = time.monotonic()
        at, misses = self._scanned.get(pid, (-1e18, 0))
        if now - at < self.thread_scan_s * (1 << min(misses, MAX_BACKOFF)):
            return None                   # scans found nothing a moment ago
        try:
            tids = [int(t) for t in os.listdir(f"{self.proc}/{pid}/task")[:MAX_THREADS + 1]]
        except (OSError, ValueError):
            return None
        for t in tids:
            if t == pid or t == tid:
                continue
            self.thread_reads += 1
            got = self._peer_of(pid, _wait_socket(pid, self.proc, self.machine, tid=t, epoll=not root), members)
            if got is not None:
                self._net_tid[pid] = t
                self._scanned.pop(pid, None)
                return self._in_thread(pid, t, got)
        self._scanned[pid] = (now, misses + 1)
        return None

    def rearm(self) -> None:
        """A GPU computed since the last poll: the backoff of thread scans that found nothing
        ends, so the next idle spell's first poll scans again (one scan per spell at most;
        kept across spells, a scan 4 s off missed a 2.2 s window of a thread pool's fetch)."""
        self._scanned.clear()

    def _in_thread(self, pid: int, tid: int, got: tuple) -> tuple:
        try:
            with open(f"{self.proc}/{pid}/task/{tid}/comm", "rb") as f:
                name = f.read().strip().decode(errors="replace")
        except OSError:
            name = str(tid)
        return f"{got[0]} in thread {name}", got[1]

    def _peer_of(self, pid: int, got, members: set):
        """(call, peer) for a (call, socket inodes) wait of ``pid``, or None unless the
        sockets' established TCP connections all go to one service (``TcpPeers.one_peer``) and
        the far end of the one named is no member's."""
        if got is None:
            return None
        one = self.peers.one_peer(pid, got[1])
        if one is None:
            return None
        ino, peer = one
        far = self.peers.other_end(pid, ino)
        if far is not None:
            if far not in self._family_end:
                if len(self._family_end) > 4096:
                    self._family_end.clear()
                self._family_end[far] = any(far in socket_inodes(m, self.proc) for m in members)
            if self._family_end[far]:
                return None
        return got[0], peer

    def poll(self, roots, all_owners=None, generation=None):
        pids, comms, vals, waits = [], [], [], []
        roots = {int(p) for p in roots}
        members = self.owners(roots, all_owners, generation)
        for d in (self._net_tid, self._scanned):
            for gone in [p for p in d if p not in members]:
                del d[gone]
        for pid in sorted(members):
            got = read_cpu(pid, self.proc)
            if got is not None:
                pids.append(pid)
                comms.append(got[0])
                vals.append(got[1])
                w = self._wait(pid, members, got[3], pid in roots) if got[2] == b"S" else None  # asleep
                if w is not None:
                    waits.append((pid, *w))
        if not pids:
            return None
        n = len(pids)
        now = time.time_ns()
        comm = np.empty(n, dtype=object)
        comm[:] = comms
        out = {"cpu": {"ts_ns": np.full(n, now, dtype=np.uint64),
                       "pid": np.array(pids, dtype=np.uint64), "comm": comm,
                       "cpu_ns": np.array(vals, dtype=np.uint64)}}
        if waits:
            call, peer = np.empty(len(waits), dtype=object), np.empty(len(waits), dtype=object)
            call[:] = [w[1] for w in waits]
            peer[:] = [w[2] for w in waits]
            out["wait"] = {"ts_ns": np.full(len(waits), now, dtype=np.uint64),
                           "pid": np.array([w[0] for w in waits], dtype=np.uint64), "call": call, "peer": peer}
        return out

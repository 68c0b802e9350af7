"""The RDMA family on soft-RoCE: verbs completion waits (kprobe and uprobe) and port counters.

The two soft-RoCE devices of the ``rxe_pair`` fixture talk across a veth pair, so netem on
``ssveth0`` delays or drops real RoCE packets:

* waits: ``ibv_rc_pingpong -e`` (event mode: it sleeps in ibv_get_cq_event for each
  completion) with 100 ms netem delay on the client's side of the wire (client -> server
  only). The tracer reports exactly the waits the delay makes, with the pid and device, and
  together they account for the time the program itself reports per iteration:
  - the client waits once per iteration, about 100 ms, for its ping to arrive: the server's
    ACK and its pong come back undelayed and together;
  - the server waits once per iteration for a ping, and once more at the end: for the
    client's ACK of the last pong, which crosses the delayed direction;
* the same through the uprobe on libibverbs (loaded in-process, the method kernels without
  kprobes would get), and what that uprobe costs per call;
* counters: 10% loss of the RoCE packets (UDP port 4791) the client's device sends, by a
  netem qdisc that only they pass, under an RC ping-pong, makes rdma_rxe retry and see
  sequence errors; the tracer's "rdma_counter" rows (sysfs hw_counters deltas, in its
  recording) add up to exactly what sysfs moved by, retries included, and they agree with
  the loss injected: the client's device sent exactly the packets netem saw, and at least
  the packets netem dropped never arrived (more when the server's device refused a late
  one for a queue pair already gone).
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import time

import pytest

from guestutil import run
from probe_env import MIN_LATENCY_MS, RDMA_KPROBE_NEEDS, hw_counters, kernel_lacks

ITERS = 23
DELAY_MS = 100


def pingpong(rxe, iters: int, port: int, events: bool) -> dict:
    """ibv_rc_pingpong between the pair (server on b, client on a); pids and usec/iter of each side."""
    common = ["-n", str(iters), "-p", str(port)] + (["-e"] if events else [])
    server = subprocess.Popen(["ibv_rc_pingpong", "-d", rxe.devices[1], "-g", str(rxe.gid_index[1]), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            client = subprocess.Popen(["ibv_rc_pingpong", "-d", rxe.devices[0], "-g", str(rxe.gid_index[0]),
                                       *common, "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            c_out, _ = client.communicate(timeout=120)
            if client.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.5)       # the server is not listening yet
        s_out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert client.returncode == 0 and server.returncode == 0, f"client: {c_out}\nserver: {s_out}"

    def usec(out):
        m = re.search(rf"{iters} iters in [\d.]+ seconds = ([\d.]+) usec/iter", out)
        assert m, out
        return float(m.group(1))
    return {"client_pid": client.pid, "server_pid": server.pid, "client_usec": usec(c_out),
            "server_usec": usec(s_out)}


def check_waits(events: list, pp: dict, rxe, what: str) -> None:
    """The client's waits: one per iteration, on its device, each at least the delay, adding
    up to (most of) its loop time; the server's: one per iteration and one for the last ACK."""
    mine = [e for e in events if e["pid"] == pp["client_pid"]]
    server = [e for e in events if e["pid"] == pp["server_pid"]]
    assert (len(mine), len(server)) == (ITERS, ITERS + 1), (what, [e["dur_ns"] for e in mine],
                                                            [e["dur_ns"] for e in server])
    loop_ns = ITERS * pp["client_usec"] * 1000
    waited = sum(e["dur_ns"] for e in mine)
    assert 0.6 * loop_ns <= waited <= 1.05 * loop_ns, (what, waited, loop_ns, mine)
    for e in mine:
        assert (e["device"], e["op"], e["comm"]) == (rxe.devices[0], "rdma_get_cq_event", "ibv_rc_pingpong"), e
        assert e["dur_ns"] >= MIN_LATENCY_MS * 1_000_000 and e["bytes"] >= 1, e
    assert all(e["device"] == rxe.devices[1] for e in server), (what, server)


@pytest.mark.matrix("RDMA verbs completion waits (soft-RoCE)", "kprobe")
def test_rdma_completion_waits_kprobe(probe_tracers, rxe_pair, netem, matrix_unavailable):
    t = probe_tracers.nfs_rdma
    t.wait_ready()
    if "rdma: kprobe/kretprobe ib_uverbs_comp_event_read" not in t.stderr:
        # the tracer picks the best method it can load: kprobe unless the kernel cannot
        lacking = [fact for fact, has in RDMA_KPROBE_NEEDS.items() if not has()]
        assert lacking, f"rdma did not load with kprobes although this kernel has {list(RDMA_KPROBE_NEEDS)}:\n{t.stderr}"
        assert "rdma: uprobe/uretprobe libibverbs.so.1:ibv_get_cq_event" in t.stderr, t.stderr
        return matrix_unavailable(f"kernel lacks {'; '.join(lacking)}: the tracer fell back to the uprobe")
    netem(rxe_pair.netdevs[0], "delay", f"{DELAY_MS}ms")
    start = time.time_ns()
    pp = pingpong(rxe_pair, ITERS, 18611, events=True)
    pids = (pp["client_pid"], pp["server_pid"])
    t.wait_events(lambda e: e["type"] == "rdma" and e["pid"] in pids, 2 * ITERS + 1)
    check_waits(t.events(lambda e: e["type"] == "rdma" and e["pid"] in pids and e["ts_ns"] >= start),
                pp, rxe_pair, "kprobe")


def _recorded_counters(recording, since_ns: int, until_ns: int) -> dict:
    """Sum of the tracer's rdma_counter deltas per (device, counter) over intervals ending in the window."""
    from stallscope.wire.recording import read_recording

    sums = {}
    for batch in read_recording(str(recording)):
        tab = batch.tables.get("rdma_counter")
        if not tab:
            continue
        for ts, dur, dev, ctr, delta in zip(tab["ts_ns"], tab["dur_ns"], tab["device"], tab["counter"], tab["delta"]):
            end = int(ts) + int(dur)
            if since_ns < end <= until_ns:
                sums[(dev, ctr)] = sums.get((dev, ctr), 0) + int(delta)
    return sums


ROCE_LOSS_HANDLE = "10:"


def roce_loss(dev: str, percent: int) -> None:
    """Drop ``percent`` of the RoCE v2 packets (UDP to port 4791) leaving ``dev``, and nothing
    else: a prio qdisc sends every other packet to a plain band, a u32 filter sends RoCE to
    the band with netem (handle 10:, whose counts are then RoCE packets only)."""
    script = f"""set -e
modprobe sch_netem
tc qdisc del dev {dev} root 2>/dev/null || true
tc qdisc add dev {dev} root handle 1: prio bands 2 priomap {' '.join(['1'] * 16)}
tc qdisc add dev {dev} parent 1:1 handle {ROCE_LOSS_HANDLE} netem loss {percent}%
tc filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip protocol 17 0xff match ip dport 4791 0xffff flowid 1:1
"""
    run("sh", "-c", script)


def netem_counts(dev: str) -> tuple[int, int]:
    """(packets netem passed, packets it dropped) by the RoCE loss qdisc on ``dev``."""
    out = run("tc", "-s", "qdisc", "show", "dev", dev)
    m = re.search(rf"qdisc netem {ROCE_LOSS_HANDLE} .*?\n\s*Sent \d+ bytes (\d+) pkt \(dropped (\d+),", out, re.S)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.mark.matrix("RDMA port counters (soft-RoCE)", "sysfs")
def test_rdma_counters_report_retries_under_loss(probe_tracers, rxe_pair, netem):
    t = probe_tracers.nfs_rdma
    t.wait_ready()
    assert kernel_lacks("rdma", t.stderr, {}) is None      # loaded, with whichever method
    time.sleep(2.5)            # earlier traffic's counter changes are behind at least one poll (1 s)
    before = {d: hw_counters(d) for d in rxe_pair.devices}
    since = time.time_ns()
    netem(rxe_pair.netdevs[0], "delay", "0ms")          # (the fixture takes the root qdisc off after)
    roce_loss(rxe_pair.netdevs[0], 10)
    # 60 round trips: ~120 packets at 10% loss (no loss at all: p < 1e-5). Under loss the
    # server side of ibv_rc_pingpong can wait forever for a last message whose sender (the
    # client) already exited; it is killed after 60 s. What this test checks is the counters,
    # which the retries before that have moved either way.
    # Setting the pair up can fail under the loss too (5.10: "Failed to modify QP to RTR", the
    # client's read of the remote address ENOSPC): another pair, on another port, up to 3 times.
    for attempt in range(3):
        try:
            pingpong(rxe_pair, 60, 18612 + 10 * attempt, events=False)
            break
        except subprocess.TimeoutExpired:
            break
        except AssertionError:
            if attempt == 2:
                raise
    time.sleep(1)              # the last retries of a pair whose peer left
    passed, dropped = netem_counts(rxe_pair.netdevs[0])
    run("stallscope-netem", rxe_pair.netdevs[0], "off")
    after = {d: hw_counters(d) for d in rxe_pair.devices}
    time.sleep(3.5)            # two more polls, and the batch that carries them
    got = _recorded_counters(probe_tracers.recording, since, time.time_ns())
    truth = {(d, c): after[d][c] - before[d][c] for d in rxe_pair.devices for c in after[d]
             if after[d][c] != before[d][c]}
    retries = sum(v for (d, c), v in truth.items() if c in ("hw_counters/completer_retry_err",
                                                             "hw_counters/rcvd_seq_err",
                                                             "hw_counters/out_of_seq_request"))
    assert retries > 0, f"10% loss produced no retries or sequence errors: {truth}"
    mine = {k: v for k, v in got.items() if k[0] in rxe_pair.devices}
    assert mine == truth, f"tracer: {mine}\nsysfs: {truth}"
    # against the loss injected: what the client's device sent is what netem saw, and what
    # netem dropped never reached the server's device
    a, b = rxe_pair.devices
    sent_a, rcvd_b = mine.get((a, "hw_counters/sent_pkts"), 0), mine.get((b, "hw_counters/rcvd_pkts"), 0)
    assert dropped > 0 and sent_a == passed + dropped, (passed, dropped, mine)
    assert sent_a - rcvd_b >= dropped, (passed, dropped, mine)


@pytest.mark.matrix("RDMA verbs completion waits (soft-RoCE)", "uprobe")
def test_rdma_completion_waits_uprobe_and_its_cost(probe_tracers, rxe_pair, netem):
    """The uprobe method, loaded in-process as tracer/probes.py would where kprobes are missing."""
    from stallscope.tracer import decode, kernel, probes
    from stallscope.tracer.families import rdma as probes_rdma
    from stallscope.tracer.agent import clock_mapping
    from stallscope.wire.schema import T_RDMA

    kernel.ensure_headers()
    cfg = probes.ProbeConfig(min_latency_ns=MIN_LATENCY_MS * 1_000_000, families=("rdma",))
    (name, fn), = [m for m in probes_rdma.methods(cfg, kernel.tracefs_root())
                   if m[0] == "uprobe"]
    b, detail = fn()
    probe = probes.LoadedProbe("rdma", name, b, detail)
    try:
        assert re.match(r"uprobe/uretprobe libibverbs\.so\.1:ibv_get_cq_event \(2 symbol versions", detail), detail
        netem(rxe_pair.netdevs[0], "delay", f"{DELAY_MS}ms")
        pp = pingpong(rxe_pair, ITERS, 18613, events=True)
        recs = probe.drain()
        tab = decode.split(recs, clock_mapping()[0], {T_RDMA: name}).get("rdma")
        assert tab is not None, "the uprobe reported no wait"
        events = [dict(zip(tab, vals)) for vals in zip(*tab.values())]
        check_waits(events, pp, rxe_pair, "uprobe")

        # cost per call of the uprobe pair: the same handlers on a cheap libibverbs function
        lib = probes_rdma.libibverbs_path()
        ibv = ctypes.CDLL(lib)
        f = ibv.ibv_wc_status_str

        def per_call_ns(n):
            t0 = time.perf_counter_ns()
            for i in range(n):
                f(i & 7)
            return (time.perf_counter_ns() - t0) / n
        base = min(per_call_ns(2000) for _ in range(3))
        from bcc import BPF
        addr = BPF.get_user_functions_and_addresses(lib.encode(), b"^ibv_wc_status_str$")[0][1]
        b.attach_uprobe(name=lib.encode(), addr=addr, fn_name=b"ss_up_cq_event")
        b.attach_uretprobe(name=lib.encode(), addr=addr, fn_name=b"ss_up_cq_event_ret")
        probed = min(per_call_ns(2000) for _ in range(3))
        cost_us = (probed - base) / 1000
        print(f"uprobe pair cost in the guest (TCG): {cost_us:.1f} us per call "
              f"(call {base / 1000:.2f} us -> {probed / 1000:.2f} us)")
        assert cost_us > 0, (base, probed)
    finally:
        probe.close()

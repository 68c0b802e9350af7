"""VFS probes through kprobes and fentry on the guest's 6.1 kernel, on real NFS stalls.

The stall is real: nfsload.py (a known pid) makes LOAD_COUNT O_DIRECT reads, O_DIRECT writes
and fsyncs of known files on the loopback NFS mounts while netem delays every packet on lo
by NETEM_DELAY_MS, so each call waits for at least one RPC round trip (>= 2 x the delay).
`stallscope trace --attach kprobe` (vfs_read/vfs_write/vfs_fsync_range kprobes) and
`--attach fentry` must report exactly those calls, by that pid, with the file's path on the
mount, the filesystem "nfs", and the latency the process itself measured.
"""

from __future__ import annotations

import pytest

from probe_env import LOAD_COUNT, NETEM_DELAY_MS, summary

VFS_OPS = {"pread": ("read", "data"), "pwrite": ("write", "out"), "fsync": ("fsync", "ckpt")}


def check_against_calls(events: list, calls: list, what: str, context=lambda: "") -> None:
    """Each event is one of the process's calls: same count, in order, inside its window,
    with the latency it measured (the probe sits inside the syscall: a little shorter).
    ``context()`` adds what else the tracer saw to a failure message."""
    events = sorted(events, key=lambda e: e["ts_ns"])
    assert len(events) == len(calls) == LOAD_COUNT, \
        f"{what}: {len(events)} events for {len(calls)} calls:\n" + "\n".join(map(str, events)) + \
        f"\nall events of the process:\n{context()}"
    for ev, call in zip(events, calls):
        measured = call["end_mono_ns"] - call["start_mono_ns"]
        assert measured - max(10_000_000, measured // 10) <= ev["dur_ns"] <= measured + 2_000_000, (what, ev, call)
        assert ev["dur_ns"] >= 2 * NETEM_DELAY_MS * 1_000_000 * 0.9, (what, ev)
        # wall-clock placement: within the call, give or take the clock mapping
        assert call["start_wall_ns"] - 5_000_000 <= ev["ts_ns"], (what, ev, call)
        assert ev["ts_ns"] + ev["dur_ns"] <= call["end_wall_ns"] + 5_000_000, (what, ev, call)


def _check_vfs(tracer, load, method_word):
    for op, (vfs_op, name) in VFS_OPS.items():
        path = f"{load.directory}/{name}"
        evs = tracer.wait_events(lambda e: e["type"] == "io" and e["pid"] == load.pid and e["path"] == path
                                 and e["op"] == vfs_op, LOAD_COUNT)
        check_against_calls(evs, load.calls(op), f"{method_word} {vfs_op} {path}",
                            lambda: summary(tracer.events(lambda e: e["pid"] == load.pid)) + "\n" + tracer.stderr)
        for ev in evs:
            assert ev["tid"] == load.tid and ev["comm"] == load.comm, ev
            assert ev["fs"] == "nfs", ev
            assert ev["bytes"] == (4096 if vfs_op != "fsync" else 0), ev
            assert method_word in ev["method"], ev


@pytest.mark.parametrize("version", ["3", "4.2"])
def test_vfs_kprobe_reports_each_stalled_nfs_call(probe_tracers, nfs_loads, version):
    t = probe_tracers.vfs_tcp
    t.wait_ready()
    assert "vfs: kprobe/kretprobe vfs_read vfs_write" in t.stderr, t.stderr
    _check_vfs(t, nfs_loads[version], "kprobe")


@pytest.mark.parametrize("version", ["3", "4.2"])
def test_vfs_fentry_reports_each_stalled_nfs_call(probe_tracers, nfs_loads, version):
    t = probe_tracers.vfs_fentry
    t.wait_ready()
    assert "vfs: fentry/fexit vfs_read vfs_write vfs_fsync_range" in t.stderr, t.stderr
    _check_vfs(t, nfs_loads[version], "fentry")

"""Real block probes (block:block_rq_issue -> block:block_rq_complete) on this kernel.

The slow device is a loop device whose backing file sits on SlowFS (a FUSE filesystem that
stalls each read of a "slow" file): every request of the loop device waits for one FUSE read,
so its completion comes ``DELAY_MS`` after its issue, the shape of a loop-mounted dataset
image on a slow network filesystem. ``dd iflag=direct`` issues exactly one 4 KiB request per
read, from its own context.
"""

import os
import subprocess

import pytest

from stallscope.sim.slowfs import SlowFS
from tests.bpf.tracerun import Trace

pytestmark = pytest.mark.bpf
DELAY_MS = 150
READS = 23          # a count that cannot come from unrelated activity
TOL_MS = 100        # how late the FUSE daemon may answer on a loaded 2-core machine


@pytest.fixture
def slow_loop_fs():
    """(loop device, its SlowFS): each request of the device waits DELAY_MS (set_delay changes
    it live)."""
    with SlowFS(delay_ms=DELAY_MS, slow_prefix="slow") as fs:
        fs.make_file("slow.img", 1 << 20)
        # buffered backing IO (--direct-io=off): the loop worker's read of a slow file is one
        # FUSE request each (SlowFS opens slow files direct_io), so one stall per request
        dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=off", fs.path("slow.img")],
                             capture_output=True, text=True)
        if dev.returncode != 0:
            pytest.fail(f"losetup: {dev.stderr.strip()}", pytrace=False)
        path = dev.stdout.strip()
        try:
            yield path, fs
        finally:
            subprocess.run(["losetup", "-d", path], check=False)


@pytest.fixture
def slow_loop(slow_loop_fs):
    return slow_loop_fs[0]


def test_slow_loop_device_requests_by_pid_device_sector_and_latency(slow_loop):
    name = os.path.basename(slow_loop)
    with Trace("--min-latency-ms", "100", families="block") as t:
        dd = subprocess.Popen(["dd", f"if={slow_loop}", "of=/dev/null", "bs=4096", f"count={READS}",
                               "iflag=direct"], stderr=subprocess.PIPE, text=True)
        _, err = dd.communicate(timeout=120)
        assert dd.returncode == 0, err
    t.stop()
    assert t.rc == 0, t.stderr
    assert "block: tracepoints block/block_rq_issue block/block_rq_complete block/block_getrq" in t.stderr, t.stderr
    mine = sorted((e for e in t.events if e["type"] == "block" and e["pid"] == dd.pid), key=lambda e: e["ts_ns"])
    assert len(mine) == READS, [(e["op"], e["device"], e["dur_ns"]) for e in t.events if e["type"] == "block"]
    for i, e in enumerate(mine):
        assert (e["op"], e["device"], e["bytes"], e["comm"]) == ("blk_read", name, 4096, "dd"), e   # named as iostat names it
        assert e["sector"] == i * 8, e                  # 512-byte sectors, one 4 KiB read after another
        assert DELAY_MS - 1 <= e["dur_ns"] / 1e6 <= DELAY_MS + TOL_MS, e
    # one after another: each request is issued after the previous one completed
    for a, b in zip(mine, mine[1:]):
        assert b["ts_ns"] >= a["ts_ns"] + a["dur_ns"] - 1_000_000, (a, b)


def test_requests_in_flight_together_at_one_sector_are_each_reported_or_counted(slow_loop_fs, tmp_path):
    """Four O_DIRECT reads of sector 0 at once: requests are keyed by (device, sector) as the
    tracepoints name them, so those in flight together share a slot. Each is either an event
    or counted in block.lost_inflight_collision, never silently gone. Each request waits 1 s,
    so all four are in flight together even when the dd processes start apart on a loaded
    machine. Events are counted by device and sector, whoever they name: a request issued
    from kblockd after another took the submitter's note names the issuing task."""
    from stallscope.collector.store import load_batches

    slow_loop, fs = slow_loop_fs
    fs.set_delay(1000)
    name = os.path.basename(slow_loop)
    rec = tmp_path / "blk.ssrec"
    with Trace("--min-latency-ms", "100", "-o", str(rec), families="block") as t:
        dds = [subprocess.Popen(["dd", f"if={slow_loop}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for dd in dds:
            _, err = dd.communicate(timeout=120)
            assert dd.returncode == 0, err
    t.stop()
    assert t.rc == 0, t.stderr
    pids = {dd.pid for dd in dds}
    mine = [e for e in t.events if e["type"] == "block" and e["device"] == name]
    assert all(e["sector"] == 0 and e["op"] == "blk_read" for e in mine), mine
    last = max(load_batches(str(rec)), key=lambda b: b.seq)
    collided = last.counters.get("block.lost_inflight_collision", 0)
    print({"events": [(e["pid"], e["comm"], e["dur_ns"]) for e in mine], "collided": collided,
           "below": last.counters.get("block.below_threshold", 0)})
    assert mine and {e["pid"] for e in mine} & pids, (mine, pids)
    assert len(mine) + collided == len(dds), (mine, last.counters)

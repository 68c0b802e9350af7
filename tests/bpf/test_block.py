"""Real block probes (block_rq_issue -> block_rq_complete) on this kernel, both variants:
raw tracepoints keyed by the request (the default where BTF has what it needs) and the
tracepoints keyed by (device, sector) (``--attach tracepoint``, the fallback).

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


RAW_LINE = "block: raw tracepoints block_rq_issue block_rq_complete block_getrq block_rq_requeue (keyed by request)"
TP_LINE = "block: tracepoints block/block_rq_issue block/block_rq_complete block/block_getrq"
VARIANTS = [pytest.param("auto", RAW_LINE, id="raw"), pytest.param("tracepoint", TP_LINE, id="tracepoint")]


def _last_counters(rec) -> dict:
    from stallscope.collector.store import load_batches
    return max(load_batches(str(rec)), key=lambda b: b.seq).counters


@pytest.mark.parametrize("attach,line", VARIANTS)
def test_slow_loop_device_requests_by_pid_device_sector_and_latency(slow_loop, attach, line):
    name = os.path.basename(slow_loop)
    with Trace("--min-latency-ms", "100", "--attach", attach, families="block") as t:
        dd = subprocess.Popen(["dd", f"if={slow_loop}", "of=/dev/null", "bs=4096", f"count={READS}",
                               "iflag=direct"], stderr=subprocess.PIPE, text=True)
        _, err = dd.communicate(timeout=120)
        assert dd.returncode == 0, err
    t.stop()
    assert t.rc == 0, t.stderr
    assert line in t.stderr, t.stderr
    mine = sorted((e for e in t.events if e["type"] == "block" and e["pid"] == dd.pid), key=lambda e: e["ts_ns"])
    assert len(mine) == READS, [(e["op"], e["device"], e["dur_ns"]) for e in t.events if e["type"] == "block"]
    for i, e in enumerate(mine):
        assert (e["op"], e["device"], e["bytes"], e["comm"]) == ("blk_read", name, 4096, "dd"), e   # named as iostat names it
        assert e["sector"] == i * 8, e                  # 512-byte sectors, one 4 KiB read after another
        assert DELAY_MS - 1 <= e["dur_ns"] / 1e6 <= DELAY_MS + TOL_MS, e
    # one after another: each request is issued after the previous one completed
    for a, b in zip(mine, mine[1:]):
        assert b["ts_ns"] >= a["ts_ns"] + a["dur_ns"] - 1_000_000, (a, b)


@pytest.mark.parametrize("attach,line", VARIANTS)
def test_requests_in_flight_together_at_one_sector_are_each_reported_or_counted(slow_loop_fs, tmp_path, attach, line):
    """Four O_DIRECT reads of sector 0 at once, each waiting 1 s, so all four are in flight
    together even when the dd processes start apart on a loaded machine.

    Keyed by request (raw): each is an event naming its own dd (noted at getrq by its bio),
    and nothing is counted lost. Keyed by (device, sector) as the tracepoints name requests:
    those in flight together share a slot, so each is an event, or counted in
    block.lost_inflight_collision, or (when a later request took the slot shortly before
    an earlier one completed, so the completion is timed from the later issue) counted
    below the threshold; never silently gone. Events are counted by device and sector,
    whoever they name (a request issued from kblockd after another took the submitter's
    note names the issuing task)."""
    slow_loop, fs = slow_loop_fs
    fs.set_delay(1000)
    name = os.path.basename(slow_loop)
    rec = tmp_path / "blk.ssrec"
    with Trace("--min-latency-ms", "100", "--attach", attach, "-o", str(rec), families="block") as t:
        dds = [subprocess.Popen(["dd", f"if={slow_loop}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for dd in dds:
            _, err = dd.communicate(timeout=120)
            assert dd.returncode == 0, err
    t.stop()
    assert t.rc == 0, t.stderr
    assert line in t.stderr, t.stderr
    pids = {dd.pid for dd in dds}
    mine = [e for e in t.events if e["type"] == "block" and e["device"] == name]
    assert all(e["sector"] == 0 and e["op"] == "blk_read" for e in mine), mine
    counters = _last_counters(rec)
    collided = counters.get("block.lost_inflight_collision", 0)
    print({"events": [(e["pid"], e["comm"], e["dur_ns"]) for e in mine], "collided": collided,
           "below": counters.get("block.below_threshold", 0)})
    if attach == "auto":
        assert sorted(e["pid"] for e in mine) == sorted(pids) and collided == 0, (mine, pids, counters)
        assert all(e["dur_ns"] >= 1000 * 1_000_000 for e in mine), mine
    else:
        assert mine and {e["pid"] for e in mine} & pids, (mine, pids)
        below = counters.get("block.below_threshold", 0)     # any device's: an upper bound
        assert len(mine) + collided <= len(dds) <= len(mine) + collided + below, (mine, counters)


def _flushes_completed(dev: str) -> int:
    """The block layer's own count of flush requests the device completed (field 16 of
    /sys/block/<dev>/stat, since 5.5)."""
    return int(open(f"/sys/block/{os.path.basename(dev)}/stat").read().split()[15])


@pytest.mark.parametrize("attach,line", VARIANTS)
def test_cache_flushes_of_fsyncs_are_each_reported(tmp_path, attach, line):
    """ext4 on a loop device whose backing file's fsync stalls 200 ms: eight threads each
    write and fsync their own file five times, so the loop device gets a flush request per
    journal commit, each taking the fsync's 200 ms. Each flush the block layer counts as
    completed (/sys/block/<dev>/stat) is one blk_flush event, and nothing is counted lost.
    A flush's issue names sector 0 and its completion sector -1 (unset): keyed by (device,
    sector) as named, every flush was lost (a run before the fix: 1 flush event and 19
    counted lost of 21)."""
    import threading

    with SlowFS(delay_ms=200, slow_prefix="slow", ops=("fsync",)) as fs:
        fs.make_file("slow.img", 64 << 20, fill=b"\0")
        dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=off", fs.path("slow.img")],
                             capture_output=True, text=True)
        if dev.returncode != 0:
            pytest.fail(f"losetup: {dev.stderr.strip()}", pytrace=False)
        loop = dev.stdout.strip()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop], check=True)
            subprocess.run(["mount", loop, str(mnt)], check=True)
            rec = tmp_path / "flush.ssrec"
            with Trace("--min-latency-ms", "100", "--attach", attach, "-o", str(rec), families="block") as t:
                before = _flushes_completed(loop)

                def work(i):
                    with open(mnt / f"f{i}", "wb") as f:
                        for _ in range(5):
                            f.write(os.urandom(4096))
                            f.flush()
                            os.fsync(f.fileno())
                threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                flushes = _flushes_completed(loop) - before
            t.stop()
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)
    assert t.rc == 0, t.stderr
    assert line in t.stderr, t.stderr
    name = os.path.basename(loop)
    got = [e for e in t.events if e["type"] == "block" and e["device"] == name and e["op"] == "blk_flush"]
    counters = _last_counters(rec)
    print({"flushes": flushes, "events": len(got), "counters": counters})
    assert flushes >= 8, flushes          # one journal commit per fsync round at least
    assert len(got) == flushes and counters.get("block.lost_inflight_collision", 0) == 0, (flushes, got, counters)
    for e in got:
        assert (e["sector"], e["bytes"]) == (0, 0) and e["dur_ns"] >= 199 * 1_000_000, e

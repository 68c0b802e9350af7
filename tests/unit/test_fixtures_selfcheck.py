"""Self-check of the fault-injection fixtures (tests/fixtures) that the bpf-tier tests rely on.

A probe test that finds no stall must be able to blame the probe, not the fixture: these tests
prove each fixture does what it promises, with the tracer nowhere involved. The workload checks
need nothing special; SlowFS and LossyNetns need root, /dev/fuse, iproute2 and nftables, carry
the ``bpf`` marker, and skip with the fixture's reason when something is missing.
"""

import contextlib
import errno
import os
import signal
import threading
import time

import pytest

from stallscope.sim.slowfs import SlowFS
from tests.fixtures import FixtureUnavailable
from tests.fixtures.netfault import LossyNetns, list_netns, parse_snmp
from tests.fixtures.workload import WorkloadError, run_io, start_io

DELAY_MS = 200


def _enter(cm):
    """Enter a fixture's context; FixtureUnavailable skips with its reason (fails in CI).

    Under STALLSCOPE_REQUIRE_BPF=1 (see tests/conftest.py) a missing need is a failure.
    """
    try:
        return cm.__enter__()
    except FixtureUnavailable as e:
        if os.environ.get("STALLSCOPE_REQUIRE_BPF") == "1":
            pytest.fail(f"fixture required but unavailable: {e}")
        pytest.skip(str(e))


def _timed(fn, *args):
    t0 = time.monotonic()
    fn(*args)
    return (time.monotonic() - t0) * 1000.0


# -- workload (no privileges needed) -----------------------------------------------------------

def test_workload_runs_in_a_child_with_known_pid_and_counts(tmp_path):
    path = tmp_path / "out.bin"
    res = run_io("pwrite", path, count=23, size=512)
    assert res.pid != os.getpid()
    assert res.tid == res.pid  # ops ran on the child's main thread
    assert len(res.ops) == 23
    assert all(op.ret == 512 for op in res.ops)
    assert path.stat().st_size == 23 * 512
    for a, b in zip(res.ops, res.ops[1:]):
        assert a.start_mono_ns <= a.end_mono_ns <= b.start_mono_ns
        assert a.start_wall_ns <= a.end_wall_ns <= b.start_wall_ns


@pytest.mark.parametrize("op", ["read", "pread", "readv"])
def test_workload_read_ops_transfer_size_bytes(tmp_path, op):
    path = tmp_path / "in.bin"
    path.write_bytes(b"\x01" * (7 * 4096))
    res = run_io(op, path, count=7, size=4096)
    assert [o.ret for o in res.ops] == [4096] * 7


@pytest.mark.parametrize("op", ["write", "writev", "fsync", "fdatasync"])
def test_workload_write_and_sync_ops(tmp_path, op):
    res = run_io(op, tmp_path / "w.bin", count=5, size=1000)
    expected = 0 if op in ("fsync", "fdatasync") else 1000
    assert [o.ret for o in res.ops] == [expected] * 5


def test_workload_pauses_until_go_and_names_its_thread(tmp_path):
    path = tmp_path / "paused.bin"
    with start_io("write", path, count=3, size=100, in_thread=True, comm="ssio-selfcheck") as w:
        time.sleep(0.2)
        assert path.stat().st_size == 0  # created, but nothing written before go()
        assert w.tid != w.pid
        with open(f"/proc/{w.pid}/task/{w.tid}/comm") as f:
            assert f.read().strip() == "ssio-selfcheck"
        res = w.go()
    assert (res.pid, res.tid) == (w.pid, w.tid)
    assert path.stat().st_size == 300


def test_workload_reports_failures_clearly(tmp_path):
    with pytest.raises(WorkloadError, match="No such file"):
        run_io("read", tmp_path / "missing" / "x", count=1, size=1)
    with pytest.raises(ValueError, match="unknown op"):
        run_io("mmap", tmp_path / "x", count=1, size=1)


def test_parse_snmp_reads_tcp_counters():
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm ActiveOpens RetransSegs\nTcp: 1 3 29\n")
    assert parse_snmp(text) == {"Ip": {"Forwarding": 1, "DefaultTTL": 64},
                                "Tcp": {"RtoAlgorithm": 1, "ActiveOpens": 3, "RetransSegs": 29}}


# -- SlowFS ------------------------------------------------------------------------------------

@pytest.fixture
def slowfs():
    fs = _enter(SlowFS(delay_ms=DELAY_MS, slow_prefix="slow"))
    try:
        yield fs
    finally:
        fs.__exit__(None, None, None)


@pytest.mark.bpf
def test_slowfs_stalls_slow_files_only(slowfs):
    slow = slowfs.make_file("slow.bin", 64 * 1024)
    fast = slowfs.make_file("fast.bin", 64 * 1024)
    fd = os.open(slow, os.O_RDONLY)
    try:
        # direct_io: the same 4 KiB read three times stalls three times (no page cache).
        for _ in range(3):
            assert _timed(os.pread, fd, 4096, 0) >= DELAY_MS
    finally:
        os.close(fd)
    fd = os.open(fast, os.O_RDONLY)
    try:
        assert _timed(os.pread, fd, 4096, 0) < DELAY_MS / 2
    finally:
        os.close(fd)


@pytest.mark.bpf
def test_slowfs_write_fsync_and_set_delay(slowfs):
    fd = os.open(slowfs.path("slow_ckpt"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert _timed(os.write, fd, b"x" * 4096) >= DELAY_MS
        assert _timed(os.fsync, fd) >= DELAY_MS
        slowfs.set_delay(40)
        ms = _timed(os.fdatasync, fd)
        assert 40 <= ms < DELAY_MS
        slowfs.set_delay(0)
        assert _timed(os.write, fd, b"y" * 4096) < DELAY_MS / 2
    finally:
        t0 = time.monotonic()
        os.close(fd)  # flush and release are never delayed
        assert time.monotonic() - t0 < DELAY_MS / 2000.0
    with open(os.path.join(slowfs.backing, "slow_ckpt"), "rb") as f:
        assert f.read() == b"x" * 4096 + b"y" * 4096


@pytest.mark.bpf
def test_slowfs_per_path_delay(slowfs):
    path = slowfs.make_file("fast_but_not_today.bin", 4096)
    slowfs.set_delay(DELAY_MS, path="fast_but_not_today.bin")
    with open(path, "rb", buffering=0) as f:
        assert _timed(f.read, 4096) >= DELAY_MS
    slowfs.set_delay(None, path=path)  # absolute paths under the mount work too
    with open(path, "rb", buffering=0) as f:
        assert _timed(f.read, 4096) < DELAY_MS / 2


@pytest.mark.bpf
def test_slowfs_stalls_do_not_serialize_other_requests(slowfs):
    slow = slowfs.make_file("slow.bin", 4096)
    fast = slowfs.make_file("fast.bin", 4096)
    took = []

    def read_slow():
        with open(slow, "rb", buffering=0) as f:
            took.append(_timed(f.read, 4096))

    threads = [threading.Thread(target=read_slow) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(DELAY_MS / 4000.0)
    with open(fast, "rb", buffering=0) as f:
        fast_ms = _timed(f.read, 4096)
    for t in threads:
        t.join()
    total_ms = (time.monotonic() - t0) * 1000.0
    assert fast_ms < DELAY_MS / 2      # served while three stalls were in progress
    assert min(took) >= DELAY_MS
    assert total_ms < 2 * DELAY_MS     # the three stalls overlapped


@pytest.mark.bpf
def test_slowfs_daemon_is_separate_and_cleanup_is_complete():
    fs = _enter(SlowFS(delay_ms=DELAY_MS))
    try:
        assert fs.daemon_pid != os.getpid()
        fds = os.listdir(f"/proc/{fs.daemon_pid}/fd")
        assert "/dev/fuse" in {os.readlink(f"/proc/{fs.daemon_pid}/fd/{fd}") for fd in fds}
        busy = os.open(fs.make_file("slow.bin", 4096), os.O_RDONLY)  # makes the mount busy
    finally:
        fs.__exit__(None, None, None)
    try:
        with open("/proc/self/mountinfo") as f:
            assert fs.mountpoint not in f.read()
        assert not os.path.exists(f"/proc/{fs.daemon_pid}")
        assert not os.path.exists(fs.mountpoint)
        with pytest.raises(OSError) as err:  # the stopped daemon's files fail, never hang
            os.pread(busy, 1, 0)
        assert err.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):  # closing flushes, which fails with ENOTCONN too
            os.close(busy)


# -- LossyNetns --------------------------------------------------------------------------------

@pytest.mark.bpf
def test_lossy_netns_retransmits_and_is_deleted():
    ns = _enter(LossyNetns(port=7001, drop_percent=20))
    try:
        assert ns.name in list_netns()
        ns.set_drop(0)
        probes_before = ns.snmp()["TcpExt"]["TCPLossProbes"]
        clean = ns.run_exchange(n_messages=50)
        probes = ns.snmp()["TcpExt"]["TCPLossProbes"] - probes_before
        # The control: no rule, no loss, so no loss repair. A tail-loss probe may still resend
        # a burst's last segment when the server is descheduled past the probe timeout (a few
        # ms here), as on one loaded CI machine (1 retransmit, 1 probe); a drop rule still in
        # force would show SACK fast retransmits and timeouts, which are not probes.
        assert clean.retrans_segs <= probes, (clean.retrans_segs, probes)
        ns.set_drop(20)
        before = ns.nstat_retrans()
        ex = ns.run_exchange()
        assert ex.retrans_segs >= 20
        time.sleep(0.5)  # longer than a loss probe or RTO here: any late retransmit would show
        assert ns.nstat_retrans() - before == ex.retrans_segs
        assert len({ex.client_pid, ex.server_pid, os.getpid()}) == 3
        assert ex.server_port == 7001 and ex.client_port not in (0, 7001)
        assert ex.start_wall_ns < ex.end_wall_ns
    finally:
        ns.__exit__(None, None, None)
    assert ns.name not in list_netns()
    assert not os.path.exists(f"/run/netns/{ns.name}")


@pytest.mark.bpf
def test_slowfs_cleans_up_after_its_daemon_died():
    fs = _enter(SlowFS(delay_ms=DELAY_MS))
    try:
        os.kill(fs.daemon_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while os.path.ismount(fs.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.02)  # ismount turns False once stat() gets ENOTCONN
    finally:
        fs.__exit__(None, None, None)
    with open("/proc/self/mountinfo") as f:
        assert fs.mountpoint not in f.read()
    assert not os.path.exists(fs.mountpoint)

"""Least privilege, for real: the tracer keeps only what its loop uses once the probes are
attached (tracer/privileges.py), and the collector runs as nobody."""

import os
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from stallscope.collector.store import load_batches
from stallscope.sim.slowfs import SlowFS
from stallscope.tracer import privileges
from tests.bpf.tracerun import ROOT, Trace, stallscope_argv
from tests.fixtures.workload import start_io
from tests.netutil import free_port

pytestmark = pytest.mark.bpf


def test_tracer_keeps_only_the_runtime_set_and_still_traces():
    kept = privileges.mask_of(privileges.runtime_needs())
    with SlowFS(delay_ms=150) as fs:
        path = fs.make_file("slow.bin", 1 << 20)
        w = start_io("pread", path, count=5, size=4096)
        # the sched family too: its flush (BPF_PROG_TEST_RUN) and map reads run after the drop
        with Trace("--min-latency-ms", "100", "--pid", str(w.pid), families="vfs,sched") as t:
            caps = privileges.status_caps(t.proc.pid)
            res = w.go()
            time.sleep(0.5)
            after = privileges.status_caps(t.proc.pid)
        t.stop()
    assert t.rc == 0, t.stderr
    for c in (caps, after):
        assert c["CapEff"] == kept and c["CapPrm"] == kept and c["CapBnd"] == kept, \
            {k: privileges.names(v) for k, v in c.items() if k.startswith("Cap")}
        assert c["CapInh"] == 0 and c["CapAmb"] == 0 and c["NoNewPrivs"] == 1
    assert "privileges: kept CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE" in t.stderr
    mine = [e for e in t.events if e["pid"] == res.pid and e["type"] == "io" and e["op"] != "close"]
    assert len(mine) == 5 and all(e["path"] == path for e in mine)     # events after the drop
    assert " 0 tick errors" in t.stderr, t.stderr[-800:]


def test_keep_privileges_switch_keeps_them():
    with Trace("--min-latency-ms", "100", env={"STALLSCOPE_KEEP_PRIVILEGES": "1"}) as t:
        caps = privileges.status_caps(t.proc.pid)
    t.stop()
    assert t.rc == 0 and "kept all" in t.stderr
    assert caps["CapEff"] == privileges.status_caps("self")["CapEff"]


@pytest.fixture
def nobody_dir():
    """A directory only nobody may write (pytest's own temp dirs are root's, mode 0700)."""
    nobody = pwd.getpwnam("nobody")
    d = tempfile.mkdtemp(prefix="stallscope-nobody-")
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_collector_runs_as_nobody_and_stores_what_it_receives(nobody_dir):
    """`stallscope collect` as nobody:nogroup, no capability, no supplementary group, a store
    in a directory only nobody may write; a real tracer pushes to it over loopback."""
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed")
    nobody = pwd.getpwnam("nobody")
    store_dir = nobody_dir
    store = os.path.join(store_dir, "store.db")
    port = free_port()
    argv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
            *stallscope_argv("collect", "--bind", f"tcp://127.0.0.1:{port}", "--store", str(store), "--no-verdicts")]
    env = {**os.environ, "PYTHONPATH": ROOT, "HOME": store_dir}
    col = subprocess.Popen(argv, cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        head = b""
        while b"listening" not in head:
            assert col.poll() is None and time.monotonic() < deadline, \
                (col.returncode, head + (col.stderr.read() if col.poll() is not None else b""))
            if select.select([col.stderr], [], [], 1)[0]:
                head += os.read(col.stderr.fileno(), 4096)
        st = privileges.status_caps(col.pid)
        assert st["CapEff"] == 0 and st["CapPrm"] == 0 and st["CapBnd"] == 0
        with open(f"/proc/{col.pid}/status") as f:
            uid_line = next(ln for ln in f if ln.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(nobody.pw_uid)}
        with SlowFS(delay_ms=150) as fs:
            w = start_io("pread", fs.make_file("slow.bin", 1 << 20), count=3, size=4096)
            with Trace("--min-latency-ms", "100", "--pid", str(w.pid), "--collector", f"tcp://127.0.0.1:{port}") as t:
                res = w.go()
            t.stop()
        assert t.rc == 0, t.stderr
        stored = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                stored = [b for b in load_batches(store) if "io" in b.tables]
            except Exception:       # the store may be mid-commit; try again
                continue
            if sum(int((b.tables["io"]["pid"] == res.pid).sum()) for b in stored) >= 3:
                break
        assert sum(int((b.tables["io"]["pid"] == res.pid).sum()) for b in stored) == 3
        assert os.stat(store).st_uid == nobody.pw_uid
    finally:
        col.terminate()
        out, err = col.communicate(timeout=30)
    assert col.returncode == 0, (head + err).decode(errors="replace")[-2000:]


def test_drop_in_a_child_removes_what_is_not_kept():
    """privileges.drop_to alone, in a forked child: only the kept set stays, everywhere."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            res = privileges.drop_to({"CAP_SYS_PTRACE": "test"})
            st = privileges.status_caps("self")
            ok = (st["CapEff"] == st["CapPrm"] == st["CapBnd"] == 1 << 19 and st["NoNewPrivs"] == 1
                  and res.kept == ["CAP_SYS_PTRACE"] and not res.error)
            os.write(w, b"ok" if ok else repr((st, res)).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 4096)
    os.waitpid(pid, 0)
    assert got == b"ok", got
    assert sys.platform.startswith("linux")

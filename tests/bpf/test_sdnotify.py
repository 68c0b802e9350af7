"""The real tracer under a systemd-style $NOTIFY_SOCKET (Type=notify): READY=1 comes once the
probes are attached, with a STATUS= naming the families, and STOPPING=1 when it stops."""

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.bpf.tracerun import ROOT, stallscope_argv

pytestmark = pytest.mark.bpf


def _fd_kinds(pid):
    """Counts of the anonymous-inode kinds among a process's fds (bpf-prog, perf_event, ...)."""
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("anon_inode:"):
            k = link[len("anon_inode:"):].strip("[]")
            kinds[k] = kinds.get(k, 0) + 1
    return kinds


def _recv_until(sock, key, deadline, proc, got):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            continue
        got.append(msg)
        if key in msg.split("\n"):
            return msg
    return None


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_after_probes_attach_then_stopping(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"stallscope-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        addr = "@" + name
    else:
        addr = str(tmp_path / "notify.sock")
        sock.bind(addr)
    env = {**os.environ, "PYTHONPATH": ROOT, "NOTIFY_SOCKET": addr}
    proc = subprocess.Popen(stallscope_argv("trace", "--families", "vfs,tcp", "--no-gpu", "--quiet",
                                            "--duration", "120"),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    got = []
    try:
        ready = _recv_until(sock, "READY=1", time.monotonic() + 120, proc, got)
        kinds = _fd_kinds(proc.pid) if ready else {}
        assert ready, f"no READY=1 (got {got}); tracer rc={proc.poll()}: " \
                      f"{proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
        # at READY the programs are loaded and attached: program fds and attachment fds
        assert kinds.get("bpf-prog", 0) > 0, kinds
        attached = sum(kinds.get(k, 0) for k in ("perf_event", "bpf_link", "bpf-raw-tracepoint"))
        assert attached > 0, kinds
        status = next(line for line in ready.split("\n") if line.startswith("STATUS="))
        assert status.startswith("STATUS=tracing ") and "vfs (" in status and "tcp (" in status, status
        proc.send_signal(signal.SIGINT)
        stopping = _recv_until(sock, "STOPPING=1", time.monotonic() + 30, proc, got)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
        if stopping is None:            # sent just before the exit the loop above saw
            sock.settimeout(1.0)
            stopping = _recv_until(sock, "STOPPING=1", time.monotonic() + 1, _Exited(), got)
        assert stopping, got
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


class _Exited:
    """A proc stand-in for draining datagrams left after the process exited."""

    def poll(self):
        return None


def test_unreachable_notify_socket_is_logged_and_tracing_goes_on(tmp_path):
    """A NOTIFY_SOCKET nobody listens on: one log line per message, and the tracer exits 0."""
    r = subprocess.run(stallscope_argv("trace", "--families", "tcp", "--no-gpu", "--quiet", "--duration", "2"),
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "NOTIFY_SOCKET": str(tmp_path / "gone.sock")},
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "stallscope: tracing" in r.stderr
    fails = [ln for ln in r.stderr.splitlines() if "sd_notify" in ln]
    assert len(fails) == 2 and "READY=1" in fails[0] and "STOPPING=1" in fails[1], r.stderr

"""Missing capabilities give one line and exit code 1; usage errors exit 2."""

import os

import pytest

from tests.bpf.tracerun import run_cli

pytestmark = pytest.mark.bpf


def _one_line_failure(r):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_without_root():
    r = run_cli("trace", "--duration", "1", user="65534")
    assert "needs root" in _one_line_failure(r)


def test_without_bcc(tmp_path):
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libbcc.so.0: cannot open shared object file')\n")
    r = run_cli("trace", "--duration", "1", env={"PYTHONPATH": f"{tmp_path}:{os.getcwd()}"})
    line = _one_line_failure(r)
    assert "BCC is not usable" in line and "python3-bpfcc" in line


def test_without_tracefs():
    r = run_cli("trace", "--duration", "1", env={"STALLSCOPE_TRACEFS": "/nonexistent/tracing"})
    assert "tracefs not found" in _one_line_failure(r)


def test_usage_errors_exit_2():
    r = run_cli("trace", "--families", "vfs,bogus")
    assert r.returncode == 2 and "unknown probe family" in r.stderr
    r = run_cli("trace", "--min-latency-ms", "-3")
    assert r.returncode == 2


def test_help_has_examples():
    r = run_cli("trace", "--help")
    assert r.returncode == 0 and "Examples:" in r.stdout and "--collector" in r.stdout


def test_missing_probe_point_loses_that_family_only(tmp_path):
    """A kernel without the TCP tracepoints: tcp is reported not loaded, vfs still traces."""
    real = "/sys/kernel/tracing"
    fake = tmp_path / "tracing"
    (fake / "events").mkdir(parents=True)
    for sub in os.listdir(os.path.join(real, "events")):
        if sub != "tcp":
            os.symlink(os.path.join(real, "events", sub), fake / "events" / sub)
    r = run_cli("trace", "--families", "vfs,tcp", "--no-gpu", "--duration", "2",
                env={"STALLSCOPE_TRACEFS": str(fake)})
    assert r.returncode == 0, r.stderr
    assert "tcp: not loaded" in r.stderr and "tcp/tcp_retransmit_skb not found" in r.stderr
    assert "vfs: syscall tracepoints" in r.stderr or "vfs: fentry" in r.stderr or "vfs: kprobe" in r.stderr


def test_full_disk_recording_counts_drops_and_keeps_tracing():
    """/dev/full fails every write with ENOSPC: the tracer says so once, keeps running, exits 0."""
    r = run_cli("trace", "--families", "vfs", "--no-gpu", "--duration", "3", "--output", "/dev/full")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("No space left on device") == 1 and "disk full" in r.stderr

"""Run the real `stallscope trace` CLI as a subprocess for a test and collect its JSON events."""

import json
import os
import select
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stallscope_argv(*args):
    return [sys.executable, "-m", "stallscope", *args]


class Trace:
    """`with Trace("--min-latency-ms", "50") as t: ...; events = t.events` (JSON dicts).

    Waits for the tracer to report that its probes are attached before the body runs.
    """

    def __init__(self, *args, families="vfs", ready_timeout_s=60.0, env=None, gpu=False):
        self.args = ["trace", "--json", "--families", families, "--gpu" if gpu else "--no-gpu", *args]
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
        self.events = []
        self.stderr = ""
        self.rc = None

    def __enter__(self):
        self.proc = subprocess.Popen(stallscope_argv(*self.args), cwd=ROOT, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.ready_timeout_s
        buf = b""
        while b"stallscope: tracing" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise RuntimeError(f"tracer did not start (rc={self.proc.returncode}): "
                                   f"{(buf + err).decode(errors='replace')[-2000:]}")
            r, _, _ = select.select([self.proc.stderr], [], [], left)
            if r:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                buf += chunk
        self._stderr_head = buf
        return self

    def stop(self, timeout_s=30.0):
        if self.rc is not None:
            return
        time.sleep(0.6)      # let the last batch (250 ms period) and episode gap pass
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout_s)
        self.rc = self.proc.returncode
        self.stderr = (self._stderr_head + err).decode(errors="replace")
        self.events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]

    def __exit__(self, *exc):
        if self.rc is None:
            try:
                self.stop()
            except Exception:
                self.proc.kill()
                self.proc.wait()
        return False


def run_cli(*args, env=None, timeout=120, user=None):
    """Run `stallscope ARGS`; returns CompletedProcess (text)."""
    argv = stallscope_argv(*args)
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + argv
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)

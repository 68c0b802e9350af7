"""A process in a cgroup made for the test, so the kernel writes its /proc/<pid>/cgroup line
(root; used on the host and in the VM guest)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time


@contextlib.contextmanager
def moved_child(root: str, rel: str):
    """Make ``root/rel`` (each missing level), move a sleeping child into it, yield its pid;
    kill it and remove what was made afterwards."""
    made, d = [], root
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for part in rel.split("/"):
            d = os.path.join(d, part)
            if not os.path.isdir(d):
                os.mkdir(d)
                made.append(d)
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(child.pid))
        yield child.pid
    finally:
        child.kill()
        child.wait()
        for m in reversed(made):
            for _ in range(100):        # the killed child leaves the cgroup asynchronously
                try:
                    os.rmdir(m)
                    break
                except OSError:
                    time.sleep(0.02)

"""Simulators and demo workloads (not part of the tracer or the collector).

The demo that `stallscope demo` runs where no GPU is present: a training-like
workload on the simulated GPU (sim/nvmlsim) whose dataset and checkpoints
sit on a FUSE filesystem that stalls on purpose (slowfs). The bpf-tier
scenario tests drive the same pieces.
"""

import os
import shutil
import sys


class Unavailable(RuntimeError):
    """This machine lacks what the demo needs (root, a tool, a kernel feature)."""


def require_root(what):
    if os.geteuid() != 0:
        raise Unavailable(f"{what} needs root (euid is {os.geteuid()})")


def require_tool(name, package):
    """Path of executable ``name``, or Unavailable naming its Debian package."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise Unavailable(f"'{name}' not found (Debian package {package})")
    return path


def child_command(module, func, *args, path=None):
    """argv running ``<module>.<func>(list_of_str_args)`` in a fresh interpreter (this
    one, so the same installed ``stallscope``), with ``path`` first on its sys.path if
    given; the child imports before it signals readiness, so its start-up file reads
    never mix with the IO a test measures."""
    code = f"import sys; sys.path.insert(0, sys.argv[1]); from {module} import {func}; {func}(sys.argv[2:])"
    return [sys.executable, "-c", code, path or "", *[str(a) for a in args]]

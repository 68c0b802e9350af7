"""The demo that `stallscope demo` runs where no GPU is present: a training-like
workload on the simulated GPU (tracer/nvmlsim) whose dataset and checkpoints
sit on a FUSE filesystem that stalls on purpose (slowfs). The bpf-tier
scenario tests drive the same pieces.
"""

import os
import shutil
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def child_command(module, func, *args):
    """argv running ``<module>.<func>(list_of_str_args)`` in a fresh interpreter with the
    repository root first on its path (the child imports before it signals readiness)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        f"from {module} import {func}; {func}(sys.argv[2:])"
    )
    return [sys.executable, "-c", code, REPO_ROOT, *[str(a) for a in args]]

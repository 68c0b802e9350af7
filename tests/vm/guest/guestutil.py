"""Helpers shared by the guest tests and their fixtures (importable: this directory is on sys.path)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest


def kernel_series(release: str = "") -> str:
    """"5.10", "6.1", "6.12": the major.minor of a kernel release (default: the running one)."""
    m = re.match(r"(\d+\.\d+)", release or os.uname().release)
    return m.group(1) if m else ""


def kernel_at_least(major: int, minor: int) -> bool:
    series = kernel_series()
    return tuple(int(x) for x in series.split(".")) >= (major, minor) if series else False


def run(*cmd: str, timeout: float = 120) -> str:
    """Run a command, return its stdout; fail the test with its stderr if it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}",
                    pytrace=False)
    return proc.stdout

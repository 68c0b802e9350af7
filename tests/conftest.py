"""Test tiers: unit (default), bpf (root + this kernel), vm (QEMU), gpu (prepared script).

A bpf test skips with a reason when its needs are unmet, except under
STALLSCOPE_REQUIRE_BPF=1 (CI, `make test`), where an unmet need fails it: a
broken set-up must not pass as green.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def bpf_unmet():
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except Exception as e:
        return f"BCC not importable: {e}"
    if not os.path.isdir("/sys/kernel/tracing/events") and not os.path.isdir("/sys/kernel/debug/tracing/events"):
        os.system("mount -t tracefs nodev /sys/kernel/tracing >/dev/null 2>&1")
        if not os.path.isdir("/sys/kernel/tracing/events"):
            return "tracefs not mounted"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("bpf"):
        why = bpf_unmet()
        if why:
            if os.environ.get("STALLSCOPE_REQUIRE_BPF") == "1":
                pytest.fail(f"bpf tier required but unavailable: {why}")
            pytest.skip(f"bpf tier: {why}")

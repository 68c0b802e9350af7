"""Host side of the vm tier: each kernel of the matrix boots, runs the guest suite, and reports
each guest test under its kernel.

The guest tests themselves live in ``tests/vm/guest/`` and run inside the VM, one session
per kernel (see ``conftest.py``); ``test_guest[<kernel>-<module>.<test>]`` passes or fails as
the guest test did on that kernel (a guest skip fails under STALLSCOPE_REQUIRE_VM=1).
"""

import re

import pytest

pytestmark = pytest.mark.vm

#: what `uname -r` of each kernel's image looks like (Debian's ABI-versioned release names)
RELEASE = {"5.10": r"5\.10\.\d+-\d+-amd64", "6.1": r"6\.1\.\d+-\d+-amd64", "6.12": r"6\.12\.\d+(\+deb13)?-amd64"}


def test_vm_boots_and_runs_the_guest_suite(kernel, guest_session):
    """The VM booted this kernel, ran the guest pytest, and its exit code and results came back."""
    s = guest_session
    r = s.result
    assert re.fullmatch(RELEASE[kernel], s.image.kernel_release), \
        f"the {kernel} image's kernel is {s.image.kernel_release}"
    assert f"stallscope-guest: kernel {s.image.kernel_release}" in r.stdout, (
        "the guest did not boot the image's kernel or did not run the script\n" + s.guest_output_tail()
    )
    assert r.exit_code in (0, 1), f"guest pytest exited {r.exit_code} (usage/internal error)\n" + s.guest_output_tail()
    assert s.junit_error is None, s.junit_error
    ran = sum(len(cases) for cases in s.cases.values())
    assert ran > 0, "the guest ran no test\n" + s.guest_output_tail()
    failed = sum(c.status in ("failed", "error") for cases in s.cases.values() for c in cases)
    failed += len(s.module_errors)
    # pytest exits 1 exactly when something failed: a mismatch means the exit code was lost on the way.
    assert (r.exit_code == 1) == (failed > 0), (
        f"guest exit code {r.exit_code} does not match {failed} failed guest tests in its junit XML"
    )
    # the per-kernel result that README's matrix is rendered from
    assert s.guest_result is not None, "the guest wrote no usable result.json\n" + s.guest_output_tail()
    assert s.guest_result["kernel_release"] == s.image.kernel_release, s.guest_result
    assert s.guest_result["cells"], "result.json has no matrix cell"


def test_guest(kernel, guest_test, guest_session):
    guest_session.check(guest_test)

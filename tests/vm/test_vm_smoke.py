"""Host side of the vm tier: the VM boots, runs the guest suite, and reports each guest test.

The guest tests themselves live in ``tests/vm/guest/`` and run inside the VM in
one session (see ``conftest.py``); ``test_guest`` has one instance per guest test,
named after it, that passes, fails or skips as the guest test did.
"""

import pytest

pytestmark = pytest.mark.vm


def test_vm_boots_and_runs_the_guest_suite(vm_guest_session):
    """The VM booted the Debian 6.1 kernel, ran the guest pytest, and its exit code came back."""
    s = vm_guest_session
    r = s.result
    assert s.image.kernel_release.startswith("6.1."), f"image kernel is {s.image.kernel_release}, expected 6.1"
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


def test_guest(guest_test, vm_guest_session):
    vm_guest_session.check(guest_test)

"""vmrun's guest-lockup watch (pure, on the host): soft lockups reported without a pause for
LOCKUP_GIVE_UP_S of guest time end the run (GuestLockup), a passing one does not."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vmrun  # noqa: E402


def _report(ts: float, cpu: int = 0) -> str:
    return f"[{ts:12.6f}] watchdog: BUG: soft lockup - CPU#{cpu} stuck for 22s! [python3:385]\n" \
           f"[{ts:12.6f}] RIP: 0010:vfs_read+0x0/0x190\n"


def test_a_lasting_lockup_is_reported_a_passing_one_is_not(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("[    1.000000] Linux version 5.10\n" + _report(76.6) + _report(76.7, 1))
    w = vmrun.LockupWatch(log)
    assert w.check() is None                       # one report: it may pass
    with open(log, "a") as f:                      # the kernel keeps reporting every ~28 s
        for ts in (104.6, 132.6, 160.6, 188.6, 216.6):
            f.write(_report(ts))
        f.write("[  230.000000] rcu: INFO: rcu_sched self-det")        # a line still being written
    assert w.check() is None                       # 140 s so far
    with open(log, "a") as f:
        f.write("ected stall on CPU\n" + _report(244.6))
    why = w.check()
    assert why == "soft lockups for 168 s of guest time from [   76.600000] watchdog: BUG: soft lockup - " \
                  "CPU#0 stuck for 22s! [python3:385]", why


def test_separate_short_lockups_do_not_add_up(tmp_path):
    log = tmp_path / "console.log"
    log.write_text(_report(50.0) + _report(78.0) + "[  200.000000] ok\n" + _report(300.0) + _report(328.0))
    assert vmrun.LockupWatch(log).check() is None
    assert vmrun.LockupWatch(tmp_path / "missing.log").check() is None
    assert issubclass(vmrun.GuestLockup, vmrun.VMError)

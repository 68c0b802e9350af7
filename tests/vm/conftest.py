"""The vm test tier: one boot of the kernel-probe test VM runs every guest test.

A boot of the test VM under software emulation costs about a minute, so the tier
boots it once per pytest session (the ``vm_guest_session`` fixture): the guest runs
``python3 -m pytest tests/vm/guest`` from the read-only repository share and writes
junit XML into its writable share; on the host, ``tests/vm/test_vm_smoke.py`` has one
test per guest test (``test_guest[<module>.<test>]``), so each guest failure is
reported under its own name, with the guest's message.

The image comes from ``vagrant/build-image.sh`` (built on first use, ~3 minutes,
then cached in /var/cache/stallscope-vm). Without qemu-system-x86_64, or without
mmdebstrap/root while no image is cached, the tier is skipped with the reason;
with ``STALLSCOPE_REQUIRE_VM=1`` (CI) it fails instead.

Environment: ``STALLSCOPE_VM_TIMEOUT`` (seconds for boot plus all guest tests,
default 1080: the guest suite takes 5-6 min on an idle 2-core host, and the tracers it starts compile every default probe family), ``STALLSCOPE_VM_ACCEL`` (auto, kvm, tcg), ``STALLSCOPE_VM_CACHE``
(image cache root).

Inside the guest (``/etc/stallscope-vm-guest`` exists, written by
vagrant/provision.sh) this file only makes ``tests/vm/guest/`` collectable; on any
other machine that directory is never collected, since its tests need the VM.
"""

from __future__ import annotations

import ast
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vmrun  # noqa: E402  (lives beside this file)

IN_GUEST = Path("/etc/stallscope-vm-guest").exists()
collect_ignore = ["test_vm_smoke.py"] if IN_GUEST else ["guest"]

GUEST_DIR = HERE / "guest"
GUEST_JUNIT = "junit.xml"
# Runs in the guest, in the repository share (/stallscope), from stallscope-vm-run.service.
GUEST_SCRIPT = f"""\
echo "stallscope-guest: kernel $(uname -r)"
python3 /stallscope/tests/vm/devtree.py /stallscope /tmp/stallscope-py
export PYTHONPATH=/tmp/stallscope-py:/stallscope${{PYTHONPATH:+:$PYTHONPATH}}
exec python3 -m pytest -p no:cacheprovider -v -rA --continue-on-collection-errors \\
    --junitxml=/stallscope-share/{GUEST_JUNIT} tests/vm/guest
"""


def guest_test_ids() -> list[str]:
    """Ids of the guest tests (``module.test`` or ``module.Class.test``), read from source.

    Read with ``ast`` rather than imported: the host cannot import the guest tests
    (they need BCC against the guest kernel), and the host test list must exist
    before the guest has run.
    """
    ids = []
    for path in sorted(GUEST_DIR.glob("test_*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                ids.append(f"{path.stem}.{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                ids += [
                    f"{path.stem}.{node.name}.{sub.name}"
                    for sub in node.body
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name.startswith("test")
                ]
    return ids


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest_test" in metafunc.fixturenames:
        ids = guest_test_ids()
        metafunc.parametrize("guest_test", ids, ids=ids)


# ---------------------------------------------------------------------------- junit


@dataclass
class GuestCase:
    """One test case as the guest's junit XML reports it."""

    name: str  # with parameters, e.g. test_nfs_loopback[4.2]
    status: str  # passed, failed, error, skipped
    message: str = ""
    text: str = ""


def parse_junit(path: Path) -> tuple[dict[str, list[GuestCase]], dict[str, str]]:
    """Guest junit XML -> ({test id: cases}, {module: collection error}).

    Test ids match ``guest_test_ids``; the cases of a parametrized test are listed
    under its one id.
    """
    cases: dict[str, list[GuestCase]] = {}
    module_errors: dict[str, str] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        status, message, text = "passed", "", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed"}.get(child.tag, child.tag)
                message, text = child.get("message", ""), (child.text or "")
                break
        if not classname:  # a module that failed to import: name is its dotted path
            module_errors[name.rsplit(".", 1)[-1]] = f"{message}\n{text}"
            continue
        owner = classname.split("guest.", 1)[-1]  # tests.vm.guest.test_x[.TestY] -> test_x[.TestY]
        cases.setdefault(f"{owner}.{name.split('[', 1)[0]}", []).append(GuestCase(name, status, message, text))
    return cases, module_errors


# ---------------------------------------------------------------------------- session


@dataclass
class GuestSession:
    """The outcome of the one guest run: the VM result and the guest's test results."""

    result: vmrun.Result
    image: vmrun.Image
    image_seconds: float
    image_built: bool
    cases: dict[str, list[GuestCase]] = field(default_factory=dict)
    module_errors: dict[str, str] = field(default_factory=dict)
    junit_error: Optional[str] = None

    def guest_output_tail(self, lines: int = 30) -> str:
        out = "\n".join(self.result.stdout.splitlines()[-lines:])
        err = "\n".join(self.result.stderr.splitlines()[-lines:])
        return f"--- guest stdout (tail) ---\n{out}\n--- guest stderr (tail) ---\n{err}\n" \
               f"(console: {self.result.console_log})"

    def check(self, test_id: str) -> None:
        """Pass, fail or skip as the guest test ``test_id`` did."""
        if self.junit_error:
            pytest.fail(f"no guest results ({self.junit_error})\n{self.guest_output_tail()}", pytrace=False)
        module = test_id.split(".", 1)[0]
        if module in self.module_errors:
            pytest.fail(f"guest could not collect {module}:\n{self.module_errors[module]}", pytrace=False)
        cases = self.cases.get(test_id)
        if not cases:
            pytest.fail(f"{test_id} did not run in the guest\n{self.guest_output_tail()}", pytrace=False)
        bad = [c for c in cases if c.status in ("failed", "error")]
        if bad:
            pytest.fail(
                "\n\n".join(f"in the guest, {c.name} {c.status}: {c.message}\n{c.text}" for c in bad), pytrace=False
            )
        if all(c.status == "skipped" for c in cases):
            pytest.skip(f"skipped in the guest: {cases[0].message}")


_session: Optional[GuestSession] = None


def _unmet_need() -> Optional[str]:
    """Why this host cannot run the vm tier, or None."""
    if sys.platform != "linux":
        return "the test VM needs a Linux host"
    if vmrun.missing_tools(need_build=False):
        return f"{vmrun.QEMU} not found (apt-get install qemu-system-x86)"
    if vmrun.cached_image() is None:
        missing = vmrun.missing_tools(need_build=True)
        if missing:
            return f"no test VM image cached and {', '.join(missing)} not found to build one " \
                   "(apt-get install mmdebstrap e2fsprogs)"
        if os.geteuid() != 0:
            return "no test VM image cached, and building one (vagrant/build-image.sh) needs root"
    return None


@pytest.fixture(scope="session")
def vm_guest_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestSession:
    """Build or reuse the image, boot the VM once, run every guest test, collect the results."""
    global _session
    unmet = _unmet_need()
    if unmet:
        if os.environ.get("STALLSCOPE_REQUIRE_VM") == "1":
            pytest.fail(f"STALLSCOPE_REQUIRE_VM=1 but {unmet}", pytrace=False)
        pytest.skip(unmet)

    capture = request.config.pluginmanager.getplugin("capturemanager")
    timeout_s = float(os.environ.get("STALLSCOPE_VM_TIMEOUT", "1080"))
    run_dir = tmp_path_factory.mktemp("vm-guest-session")
    with capture.global_and_fixture_disabled():  # show build and boot progress live
        try:
            t0 = time.monotonic()
            image = vmrun.cached_image()
            built = image is None
            if image is None:
                print("\nvm tier: building the test VM image (vagrant/build-image.sh, a few minutes)",
                      file=sys.stderr)
                image = vmrun.build_image(progress=sys.stderr)
            image_s = time.monotonic() - t0
            print("", file=sys.stderr)
            result = vmrun.run(GUEST_SCRIPT, image=image, run_dir=run_dir, timeout_s=timeout_s, progress=sys.stderr)
        except vmrun.VMError as e:
            pytest.fail(f"{e}\n{e.detail}", pytrace=False)

    session = GuestSession(result=result, image=image, image_seconds=image_s, image_built=built)
    junit = result.share / GUEST_JUNIT
    try:
        session.cases, session.module_errors = parse_junit(junit)
    except (OSError, ET.ParseError) as e:
        session.junit_error = f"{junit}: {e}"
    _session = session
    return session


def pytest_terminal_summary(terminalreporter) -> None:
    """One line with what the vm tier cost, when it ran."""
    if _session is None:
        return
    s, r = _session, _session.result
    image = f"built in {s.image_seconds:.0f} s" if s.image_built else "cached"
    boot = f"{r.boot_s:.1f} s" if r.boot_s is not None else "?"
    terminalreporter.write_line(
        f"vm tier: image {image} ({s.image.kernel_release}), boot-to-script {boot}, "
        f"full cycle {r.wall_s:.1f} s ({r.accel}); guest console: {r.console_log}"
    )

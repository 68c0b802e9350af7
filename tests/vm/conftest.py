"""The vm test tier: the kernel matrix. One boot per kernel runs every guest test.

The tier boots one image per kernel of ``vmrun.KERNELS`` (Debian 11's 5.10, 12's 6.1,
13's 6.12), one after another (two emulated CPUs each on a 2-core host: running them
side by side, or beside the host tiers, is not faster; ``_EarlyImages``). A boot under
software emulation costs about a minute, so each kernel boots once per pytest session
(``guest_session``): the guest runs
``python3 -m pytest tests/vm/guest`` from the read-only repository share and writes
junit XML and ``result.json`` (the attach method each probe got, see
``tests/vm/guest/conftest.py``) into its writable share; on the host,
``tests/vm/test_vm_smoke.py`` has one test per kernel and guest test
(``test_guest[<kernel>-<module>.<test>]``), so each failure is reported under its
kernel and its own name, with the guest's message. Each kernel's ``result.json`` is
copied to ``build/vm-results/<kernel>.json`` (``STALLSCOPE_VM_RESULTS`` moves it), from
which ``tests/vm/matrix.py`` renders README's kernel table.

The images come from ``vagrant/build-image.sh --suite`` (built on first use, ~2-3
minutes each, then cached in /var/cache/stallscope-vm). Without qemu-system-x86_64,
or without mmdebstrap/root while no image is cached, the tier is skipped with the
reason; with ``STALLSCOPE_REQUIRE_VM=1`` (CI) it fails instead, and so does every
guest test that skipped in the guest.

Environment: ``STALLSCOPE_VM_KERNELS`` (comma-separated subset of the kernels, e.g.
``6.1``; default all), ``STALLSCOPE_VM_TIMEOUT`` (seconds for one kernel's boot plus
all its guest tests, default 1800), ``STALLSCOPE_VM_ACCEL`` (auto, kvm, tcg),
``STALLSCOPE_VM_CACHE`` (image cache root), ``STALLSCOPE_VM_RESULTS``,
``STALLSCOPE_VM_EARLY`` (0: build a missing image when its kernel's first test comes, not in
the background from the end of collection).

Inside the guest (``/etc/stallscope-vm-guest`` exists, written by
vagrant/provision.sh) this file only makes ``tests/vm/guest/`` collectable; on any
other machine that directory is never collected, since its tests need the VM.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vmrun  # noqa: E402  (lives beside this file)

IN_GUEST = Path("/etc/stallscope-vm-guest").exists()
collect_ignore = ["test_vm_smoke.py"] if IN_GUEST else ["guest"]

GUEST_DIR = HERE / "guest"
GUEST_JUNIT = "junit.xml"
GUEST_RESULT = "result.json"
REQUIRE_VM = os.environ.get("STALLSCOPE_REQUIRE_VM") == "1"
RESULTS_DIR = Path(os.environ.get("STALLSCOPE_VM_RESULTS", str(vmrun.REPO / "build" / "vm-results")))


def selected_kernels() -> list[str]:
    """The kernels this session boots: ``STALLSCOPE_VM_KERNELS`` or all of ``vmrun.KERNELS``."""
    wanted = [k.strip() for k in os.environ.get("STALLSCOPE_VM_KERNELS", "").split(",") if k.strip()]
    unknown = [k for k in wanted if k not in vmrun.KERNELS]
    if unknown:
        raise pytest.UsageError(f"STALLSCOPE_VM_KERNELS: unknown kernel {', '.join(unknown)} "
                                f"(known: {', '.join(vmrun.KERNELS)})")
    return wanted or list(vmrun.KERNELS)


def guest_script(kernel: str) -> str:
    """Runs in the guest, in the repository share (/stallscope), from stallscope-vm-run.service."""
    return f"""\
echo "stallscope-guest: kernel $(uname -r)"
python3 /stallscope/tests/vm/devtree.py /stallscope /tmp/stallscope-py
export PYTHONPATH=/tmp/stallscope-py:/stallscope${{PYTHONPATH:+:$PYTHONPATH}}
export STALLSCOPE_VM_KERNEL={kernel} STALLSCOPE_VM_RESULT=/stallscope-share/{GUEST_RESULT}
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
    """One test per kernel (``kernel``), or per kernel and guest test (``guest_test``), kernel-major,
    so the kernels boot one after another and every test id names its kernel."""
    kernels = selected_kernels()
    if "guest_test" in metafunc.fixturenames:
        ids = guest_test_ids()
        pairs = [(k, t) for k in kernels for t in ids]
        metafunc.parametrize(("kernel", "guest_test"), pairs, ids=[f"{k}-{t}" for k, t in pairs])
    elif "kernel" in metafunc.fixturenames:
        metafunc.parametrize("kernel", kernels)


# ---------------------------------------------------------------------------- junit


@dataclass
class GuestCase:
    """One test case as the guest's junit XML reports it."""

    name: str  # with parameters, e.g. test_nfs_loopback[4.2]
    status: str  # passed, failed, error, skipped
    message: str = ""
    text: str = ""
    seconds: float = 0.0  # as the guest's pytest timed it (setup, call and teardown)


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
        try:
            seconds = float(tc.get("time", "0"))
        except ValueError:
            seconds = 0.0
        cases.setdefault(f"{owner}.{name.split('[', 1)[0]}", []).append(
            GuestCase(name, status, message, text, seconds))
    return cases, module_errors


# ---------------------------------------------------------------------------- session


@dataclass
class GuestSession:
    """The outcome of the one guest run: the VM result and the guest's test results."""

    kernel: str
    result: vmrun.Result
    image: vmrun.Image
    image_seconds: float
    image_built: bool
    cases: dict[str, list[GuestCase]] = field(default_factory=dict)
    module_errors: dict[str, str] = field(default_factory=dict)
    junit_error: Optional[str] = None
    guest_result: Optional[dict] = None   # the guest's result.json (attach methods, outcomes)
    lockups: list = field(default_factory=list)   # boots abandoned for a guest kernel lockup (retried)

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
        skipped = [c for c in cases if c.status == "skipped"]
        if skipped and REQUIRE_VM:
            pytest.fail("STALLSCOPE_REQUIRE_VM=1 and in the guest (kernel " + self.kernel + ") "
                        + "; ".join(f"{c.name} skipped: {c.message}" for c in skipped), pytrace=False)
        if len(skipped) == len(cases):
            pytest.skip(f"skipped in the guest: {cases[0].message}")


_sessions: dict[str, GuestSession] = {}


def _unmet_need() -> Optional[str]:
    """Why this host cannot run the vm tier, or None."""
    if sys.platform != "linux":
        return "the test VM needs a Linux host"
    if vmrun.missing_tools(need_build=False):
        return f"{vmrun.QEMU} not found (apt-get install qemu-system-x86)"
    return None


_failed_boots: dict[str, str] = {}


def _unmet_need_for(suite: str) -> Optional[str]:
    if vmrun.cached_image(suite) is None:
        missing = vmrun.missing_tools(need_build=True)
        if missing:
            return f"no {suite} test VM image cached and {', '.join(missing)} not found to build one " \
                   "(apt-get install mmdebstrap e2fsprogs)"
        if os.geteuid() != 0:
            return f"no {suite} test VM image cached, and building one (vagrant/build-image.sh) needs root"
    return None


def _save_result(session: GuestSession) -> None:
    """The guest's result.json, plus what the host measured, as RESULTS_DIR/<kernel>.json."""
    src = session.result.share / GUEST_RESULT
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        session.guest_result = None
        print(f"vm tier: kernel {session.kernel}: no usable {src.name} from the guest ({e})", file=sys.stderr)
        return
    r = session.result
    data["host"] = {"kernel_series": session.kernel, "suite": vmrun.suite_of(session.kernel),
                    "image_built": session.image_built, "image_seconds": round(session.image_seconds, 1),
                    "boot_s": None if r.boot_s is None else round(r.boot_s, 1), "wall_s": round(r.wall_s, 1),
                    "accel": r.accel, "guest_exit_code": r.exit_code,
                    "lockup_reboots": [x.splitlines()[0] for x in session.lockups]}
    session.guest_result = data
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS_DIR / f".{session.kernel}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(RESULTS_DIR / f"{session.kernel}.json")
    shutil.copy(src.parent / GUEST_JUNIT, RESULTS_DIR / f"{session.kernel}.junit.xml")


class _Unmet(Exception):
    """This host cannot run a kernel's guest (the reason): a skip, or a failure under REQUIRE_VM."""


def boot_kernel(kernel: str, progress: TextIO) -> GuestSession:
    """Build or reuse ``kernel``'s image, boot it once, run every guest test, collect the results.

    Raises ``_Unmet`` when this host cannot, ``vmrun.VMError`` when the VM failed."""
    suite = vmrun.suite_of(kernel)
    built_early = _early.wait(kernel, progress) if _early is not None and kernel in _early.done else None
    unmet = _unmet_need() or _unmet_need_for(suite)
    if unmet:
        raise _Unmet(unmet)
    timeout_s = float(os.environ.get("STALLSCOPE_VM_TIMEOUT", "1800"))
    # Not under pytest's basetemp: another pytest session on the host (other tiers, other
    # checkouts) rotates those away, share and console log included, while the guest runs.
    run_dir = Path(tempfile.mkdtemp(prefix=f"stallscope-vm-{kernel}-"))
    t0 = time.monotonic()
    image = vmrun.cached_image(suite)
    built = image is None
    if image is None:
        progress.write(f"\nvm tier: building the {suite} ({kernel}) test VM image (vagrant/build-image.sh, "
                       "a few minutes)\n")
        image = vmrun.build_image(progress=progress, suite=suite)
    image_s = time.monotonic() - t0
    if built_early is not None:     # built in the background while the host tiers ran
        built, image_s = True, built_early
    progress.write(f"\nvm tier: kernel {kernel} ({suite})\n")
    progress.flush()
    lockups: list[str] = []
    try:
        result = vmrun.run(guest_script(kernel), image=image, run_dir=run_dir, timeout_s=timeout_s,
                           progress=progress)
    except vmrun.GuestLockup as e:
        # the emulator, not the tests (vmrun.GuestLockup): boot once more, and say so; a
        # second lockup fails the kernel's tests like any VM failure
        lockups.append(f"{e}\n{e.detail}")
        progress.write(f"\nvm tier: kernel {kernel}: {e}; booting it once more\n")
        progress.flush()
        run_dir = Path(tempfile.mkdtemp(prefix=f"stallscope-vm-{kernel}-"))
        result = vmrun.run(guest_script(kernel), image=image, run_dir=run_dir, timeout_s=timeout_s,
                           progress=progress)
    session = GuestSession(kernel=kernel, result=result, image=image, image_seconds=image_s, image_built=built,
                           lockups=lockups)
    junit = result.share / GUEST_JUNIT
    try:
        session.cases, session.module_errors = parse_junit(junit)
    except (OSError, ET.ParseError) as e:
        session.junit_error = f"{junit}: {e}"
    _save_result(session)
    return session


def _boot_outcome(kernel: str, progress: TextIO) -> "GuestSession | BaseException":
    try:
        return boot_kernel(kernel, progress)
    except Exception as e:      # _Unmet, VMError, or a bug: reported by the kernel's tests
        return e


class _EarlyImages:
    """The images the selected kernels lack, built one after another in a background thread
    from the end of collection, while the host tiers run (a build is mostly downloading and
    unpacking packages: 4-6 minutes each); ``STALLSCOPE_VM_EARLY=0`` builds each when its
    kernel's first test comes instead.

    The guests themselves boot when their tests come, after the host tiers. Running the
    emulated guests (CPU-bound: they mostly compile BPF programs) beside the host tiers only
    time-shares the 2 cores, and it made timing checks fail on both sides: a FUSE stall
    answered 40 ms late on the host, and guest processes' own timing of NFS calls ran 25%
    over what the probes measured (one CI run, README's Tests section)."""

    def __init__(self, kernels: list[str]) -> None:
        self.kernels = kernels
        self.done = {k: threading.Event() for k in kernels}
        self.seconds: dict[str, float] = {}      # kernel -> build time, when built here
        self.log = Path(tempfile.mkdtemp(prefix="stallscope-vm-images-")) / "progress.log"
        self.thread = threading.Thread(target=self._run, name="stallscope-vm-images", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open(self.log, "a", buffering=1) as progress:
            for k in self.kernels:
                try:
                    suite = vmrun.suite_of(k)
                    if not (_unmet_need() or _unmet_need_for(suite)) and vmrun.cached_image(suite) is None:
                        t0 = time.monotonic()
                        vmrun.build_image(progress=progress, suite=suite)
                        self.seconds[k] = time.monotonic() - t0
                except Exception as e:      # the kernel's first test builds again and reports it
                    progress.write(f"vm tier: building the {k} image failed: {e}\n")
                finally:
                    self.done[k].set()

    def wait(self, kernel: str, progress: TextIO) -> Optional[float]:
        """Wait for ``kernel``'s image build; its seconds when it was built here, else None."""
        if not self.done[kernel].is_set():
            progress.write(f"\nvm tier: waiting for the {kernel} image (building in the background; "
                           f"progress: {self.log})\n")
            progress.flush()
            self.done[kernel].wait()
        return self.seconds.get(kernel)


_early: Optional[_EarlyImages] = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the images the selected kernels lack, in the background (``_EarlyImages``)."""
    global _early
    if IN_GUEST or os.environ.get("STALLSCOPE_VM_EARLY", "1") == "0" or session.config.option.collectonly:
        return
    kernels: list[str] = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if "guest_session" in getattr(item, "fixturenames", ()) and callspec is not None:
            k = callspec.params.get("kernel")
            if k is not None and k not in kernels:
                kernels.append(k)
    missing = [k for k in kernels if vmrun.cached_image(vmrun.suite_of(k)) is None]
    if missing:
        _early = _EarlyImages(missing)
        reporter = session.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"vm tier: building the {', '.join(missing)} image(s) in the background "
                                f"while the other tests run; progress: {_early.log}")


@pytest.fixture
def guest_session(kernel: str, request: pytest.FixtureRequest) -> GuestSession:
    """The one guest run of ``kernel`` in this pytest session (booted by its first test)."""
    if kernel not in _sessions and kernel not in _failed_boots:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # show build and boot progress live
            outcome = _boot_outcome(kernel, sys.stderr)
        if isinstance(outcome, GuestSession):
            _sessions[kernel] = outcome
        elif isinstance(outcome, _Unmet):
            if not REQUIRE_VM:
                pytest.skip(str(outcome))
            _failed_boots[kernel] = f"STALLSCOPE_REQUIRE_VM=1 but {outcome}"
        elif isinstance(outcome, vmrun.VMError):
            _failed_boots[kernel] = f"kernel {kernel}: {outcome}\n{outcome.detail}"
        else:
            _failed_boots[kernel] = f"kernel {kernel}: the guest run raised {type(outcome).__name__}: {outcome}"
    if kernel in _failed_boots:
        pytest.fail(_failed_boots[kernel], pytrace=False)
    return _sessions[kernel]


def pytest_terminal_summary(terminalreporter) -> None:
    """One line per kernel with what the vm tier cost, when it ran."""
    for kernel, s in _sessions.items():
        r = s.result
        image = f"built in {s.image_seconds:.0f} s" if s.image_built else "cached"
        boot = f"{r.boot_s:.1f} s" if r.boot_s is not None else "?"
        terminalreporter.write_line(
            f"vm tier [{kernel}]: image {image} ({s.image.kernel_release}), boot-to-script {boot}, "
            f"full cycle {r.wall_s:.1f} s ({r.accel}); guest console: {r.console_log}"
        )
        for x in s.lockups:
            terminalreporter.write_line(f"vm tier [{kernel}]: a boot was abandoned and booted again: "
                                        f"{x.splitlines()[0]}")
        for gap in (s.guest_result or {}).get("gaps", []):       # tolerated, and still open
            counters = (s.guest_result.get("tracers", {}).get("tp", {}).get("counters") or {})
            terminalreporter.write_line(
                f"vm tier [{kernel}]: {gap['test']} test missed sectors {gap['missing_sectors']} "
                f"(arrived by the end: {gap.get('arrived_later', '?')}); tp's "
                "counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())
                                         if k.startswith("block.") or "error" in k))
        slow = sorted((c for cs in s.cases.values() for c in cs), key=lambda c: -c.seconds)[:6]
        if slow:        # where a guest's minutes go (the CI time budget)
            terminalreporter.write_line(f"vm tier [{kernel}]: slowest guest tests: "
                                        + ", ".join(f"{c.name} {c.seconds:.0f} s" for c in slow))
    if _sessions:
        terminalreporter.write_line(f"vm tier: per-kernel results in {RESULTS_DIR} "
                                    "(render README's table: python3 tests/vm/matrix.py --write)")

"""Run one script in the stallscope kernel-probe test VM and return its exit code and output.

The VM is QEMU booting, headless, an image that ``vagrant/build-image.sh`` builds for
one Debian suite, and so one kernel (``KERNELS``: Debian 11's 5.10, 12's 6.1, 13's 6.12;
each with kprobes, NFS server and client, soft-RoCE, netem, BCC). The host talks to it
through two 9p shares and nothing else (no network, no ssh):

* ``mount_tag=host``, read-write, at ``/stallscope-share`` in the guest: the run
  directory's ``share/``. The host puts ``run.sh`` there; the guest's
  ``stallscope-vm-run.service`` runs it with bash at boot and writes ``started``
  (guest uptime, first), ``stdout``, ``stderr`` and ``exit-code`` (last) back, then
  powers off. Anything else the script writes under ``/stallscope-share`` (junit XML,
  recordings) is there for the host afterwards.
* ``mount_tag=repo``, read-only, at ``/stallscope``: the checkout, so the guest runs
  the code under test without copying it. The script starts in that directory.

The root disk is attached with ``snapshot=on``: every boot starts from the pristine
image and nothing the guest does survives it. The serial console goes to
``console.log`` in the run directory, so a guest that fails to boot can be diagnosed.
Only one VM runs at a time on a host (a lock file serialises callers): each one takes
two CPUs and 3 GiB.

KVM is used where it actually works (tried with a kernel-only boot, the verdict
cached per host kernel and QEMU version), otherwise software emulation (TCG), which
is 4-13x slower for CPU-bound work. ``STALLSCOPE_VM_ACCEL=kvm|tcg`` forces one.

Used by ``tests/vm/conftest.py`` (one boot for the whole vm tier) and by hand, as root::

    python3 tests/vm/vmrun.py 'uname -r; stallscope-nfs-up 4.2'
    python3 tests/vm/vmrun.py --kernel 5.10 'uname -r'     # Debian 11's kernel
    python3 tests/vm/vmrun.py --script my-test.sh --timeout 600 --out /tmp/vmrun
    python3 tests/vm/vmrun.py --shell        # serial console, root; Ctrl-a x quits QEMU

The command-line exit status is the guest script's, or 125 when the VM itself
failed (image build, QEMU, timeout, no result).

Only the standard library is used: the guest (Debian's python3) imports this module
too, through ``tests/vm/conftest.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "vagrant" / "build-image.sh"
QEMU = "qemu-system-x86_64"
# panic=-1 with -no-reboot: a guest that panics ends QEMU at once instead of at the timeout.
# The blacklist skips drivers for the PC's built-in devices that no test uses (each
# module load and probe costs time under emulation; the floppy probe most).
KERNEL_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw panic=-1 mitigations=off "
    "modprobe.blacklist=floppy,pcspkr,parport_pc,ppdev,ata_piix,ata_generic,pata_acpi,i2c_piix4,serio_raw,joydev"
)
VM_FAILED_EXIT = 125
#: The kernel matrix: kernel series -> the Debian suite whose image boots it.
KERNELS = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}
DEFAULT_SUITE = "bookworm"

# Where build-image.sh keeps images; the KVM probe verdict and the QEMU lock live there too.
CACHE_ROOT = Path(os.environ.get("STALLSCOPE_VM_CACHE", "/var/cache/stallscope-vm"))


class VMError(RuntimeError):
    """The VM could not run the script: image build, QEMU start, boot, or timeout.

    The message is one line; ``detail`` holds the evidence (console or log tail) the
    caller should show the user.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Image:
    """A built image directory (see ``vagrant/build-image.sh``)."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    @property
    def kernel_release(self) -> str:
        return (self.dir / "kernel-release").read_text().strip()

    @property
    def facts(self) -> dict:
        """The ``image.env`` facts: KERNEL_RELEASE, BUILT_AT, BUILD_SECONDS, ..."""
        pairs = (line.split("=", 1) for line in (self.dir / "image.env").read_text().splitlines() if "=" in line)
        return {k: v for k, v in pairs}

    def is_complete(self) -> bool:
        return all(p.is_file() for p in (self.kernel, self.initrd, self.rootfs, self.dir / "image.env"))


@dataclass
class Result:
    """What one VM run produced.

    ``boot_s`` is host seconds from QEMU start to the guest service starting the
    script (boot-to-shell); ``guest_uptime_s`` is the guest's own uptime then;
    ``wall_s`` is the full cycle, QEMU start to QEMU exit.
    """

    exit_code: int
    stdout: str
    stderr: str
    share: Path
    console_log: Path
    accel: str
    boot_s: Optional[float]
    guest_uptime_s: Optional[float]
    wall_s: float


class GuestLockup(VMError):
    """The guest kernel stopped making progress: soft lockups reported for ``LOCKUP_GIVE_UP_S``
    of guest time on end. Seen once under TCG (5.10, session 11's CI run): two CPUs stuck
    at ``vfs_read+0x0`` (an ftrace patch site) while BPF programs were being attached, RCU
    starved, for the rest of the 30-minute timeout. The emulator's handling of live kernel
    text patching, not the guest's tests: the caller may boot again."""


LOCKUP_GIVE_UP_S = 150.0    # guest seconds of soft lockups, reported without a pause, to give up
_LOCKUP_GAP_S = 60.0        # a report later than this after the previous one starts a new lockup
_LOCKUP_RE = re.compile(rb"\[\s*(\d+\.\d+)\] watchdog: BUG: soft lockup - CPU#\d+ stuck for \d+s! \[[^\]\n]*\]")


class LockupWatch:
    """Reads a console log as it grows; :meth:`check` says whether the guest has been in soft
    lockup for ``give_up_s`` of its own time (the kernel reports every ~20-30 s while stuck)."""

    def __init__(self, path: Path, give_up_s: float = LOCKUP_GIVE_UP_S) -> None:
        self.path, self.give_up_s = path, give_up_s
        self.offset = 0
        self.partial = b""
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.first_line = ""

    def check(self) -> Optional[str]:
        """None, or what the lockup was (its first report, how long it lasted)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return None
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            m = _LOCKUP_RE.search(line)
            if m is None:
                continue
            ts = float(m.group(1))
            if self.last is None or ts - self.last > _LOCKUP_GAP_S:
                self.first, self.first_line = ts, m.group(0).decode(errors="replace")
            self.last = ts
        if self.first is not None and self.last is not None and self.last - self.first >= self.give_up_s:
            return f"soft lockups for {self.last - self.first:.0f} s of guest time from {self.first_line}"
        return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------- image


def suite_of(kernel_or_suite: str) -> str:
    """The Debian suite for a kernel series of ``KERNELS`` ("5.10") or a suite name ("bullseye")."""
    if kernel_or_suite in KERNELS:
        return KERNELS[kernel_or_suite]
    if kernel_or_suite in KERNELS.values():
        return kernel_or_suite
    raise VMError(f"unknown kernel or suite {kernel_or_suite!r} (one of {', '.join([*KERNELS, *KERNELS.values()])})")


def image_dir(suite: str = DEFAULT_SUITE) -> Path:
    """The directory the current recipe's image of ``suite`` lives (or will live) in."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--suite", suite, "--print-dir"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def cached_image(suite: str = DEFAULT_SUITE) -> Optional[Image]:
    """The image of ``suite`` for the current recipe if it is already built, else None."""
    image = Image(image_dir(suite))
    return image if image.is_complete() else None


def build_image(progress: Optional[TextIO] = sys.stderr, suite: str = DEFAULT_SUITE) -> Image:
    """Build the image of ``suite`` (or reuse the cached one) and return it.

    Progress lines from build-image.sh are copied to ``progress``. Raises VMError
    when the build fails, with the end of its output as detail.
    """
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT), "--suite", suite], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err_lines = []
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        err_lines.append(line)
        if progress is not None:
            progress.write(line)
            progress.flush()
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise VMError(f"{BUILD_SCRIPT.name} failed with exit code {proc.returncode}", "".join(err_lines[-40:]))
    image = Image(Path(out.strip().splitlines()[-1]))
    if not image.is_complete():
        raise VMError(f"{BUILD_SCRIPT.name} reported {image.dir} but the image there is incomplete")
    return image


def missing_tools(need_build: bool) -> list[str]:
    """Host tools the VM tier needs that are absent (empty when all is there)."""
    tools = [QEMU]
    if need_build:
        tools += ["mmdebstrap", "mkfs.ext4"]
    return [t for t in tools if shutil.which(t) is None]


# ---------------------------------------------------------------------------- accel


def _qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def kvm_works(image: Image, timeout_s: float = 15.0) -> bool:
    """Whether KVM can boot the image's kernel on this host, by trying.

    ``/dev/kvm`` existing is not enough: nested or restricted KVM may refuse CPU
    state (QEMU aborts) or hang silently. A kernel-only boot with no root device
    must reach its "VFS: Unable to mount root fs" panic; with KVM that takes about a
    second. A hang costs ``timeout_s`` once: the negative verdict is cached per host
    kernel and QEMU version.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    verdict_key = f"{os.uname().release} {_qemu_version()}"
    verdict_file = CACHE_ROOT / "kvm-probe"
    with contextlib.suppress(OSError):
        cached = verdict_file.read_text().split("\n", 1)
        if len(cached) == 2 and cached[1].strip() == verdict_key:
            return cached[0] == "yes"
    with tempfile.TemporaryDirectory(prefix="stallscope-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        cmd = [
            QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-display", "none",
            "-no-reboot", "-kernel", str(image.kernel), "-append", "console=ttyS0 panic=-1",
            "-serial", f"file:{console}",
        ]
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        ok = "Unable to mount root fs" in console.read_text(errors="replace") if console.exists() else False
    with contextlib.suppress(OSError):
        verdict_file.parent.mkdir(parents=True, exist_ok=True)
        verdict_file.write_text(f"{'yes' if ok else 'no'}\n{verdict_key}\n")
    return ok


def choose_accel(image: Image, requested: str = "auto") -> str:
    """'kvm' or 'tcg': the requested one, or for 'auto' KVM where it works."""
    requested = os.environ.get("STALLSCOPE_VM_ACCEL", requested)
    if requested not in ("auto", "kvm", "tcg"):
        raise VMError(f"unknown accelerator {requested!r} (auto, kvm or tcg)")
    if requested == "auto":
        return "kvm" if kvm_works(image) else "tcg"
    return requested


# ---------------------------------------------------------------------------- qemu


def qemu_command(image: Image, share: Path, repo: Optional[Path], accel: str, memory_mb: int, cpus: int) -> list[str]:
    """The QEMU command line for one headless run."""

    def opt(path: Path) -> str:  # a comma inside a QEMU option value is written doubled
        return str(path).replace(",", ",,")

    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel_args = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    cmd = [
        QEMU, "-name", "stallscope-vm", *accel_args,
        "-smp", str(cpus), "-m", str(memory_mb),
        "-nodefaults", "-nographic", "-serial", "mon:stdio", "-no-reboot", "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_CMDLINE,
        "-drive", f"file={opt(image.rootfs)},format=raw,if=virtio,snapshot=on",
        "-device", "virtio-rng-pci",
        "-virtfs", f"local,path={opt(share)},mount_tag=host,security_model=none,multidevs=remap",
    ]
    if repo is not None:
        cmd += ["-virtfs", f"local,path={opt(repo)},mount_tag=repo,security_model=none,readonly=on,multidevs=remap"]
    return cmd


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGTERM when the process that started it dies (a killed pytest)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def _one_vm_at_a_time(progress: Optional[TextIO]) -> Iterator[None]:
    lock_path = Path(tempfile.gettempdir()) / "stallscope-vm.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress is not None:
                progress.write(f"vmrun: another stallscope VM is running; waiting for {lock_path}\n")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run(
    script: str,
    *,
    image: Image,
    run_dir: Path,
    repo: Optional[Path] = REPO,
    timeout_s: float = 900.0,
    accel: str = "auto",
    memory_mb: int = 3072,
    cpus: int = 2,
    progress: Optional[TextIO] = None,
) -> Result:
    """Boot the VM, run ``script`` (bash) in it, and return its exit code and output.

    ``run_dir`` receives ``share/`` (the guest's /stallscope-share: run.sh and what
    the guest writes) and ``console.log``; it must not hold an earlier run. ``repo``
    is shared read-only at /stallscope (None: no repo share). Raises VMError when
    the VM does not deliver an exit code within ``timeout_s`` seconds.
    """
    if not image.is_complete():
        raise VMError(f"no complete image in {image.dir} (run vagrant/build-image.sh)")
    share = run_dir / "share"
    if share.exists() and any(share.iterdir()):
        raise VMError(f"{share} is not empty: give each run a fresh run directory")
    share.mkdir(parents=True, exist_ok=True)
    (share / "run.sh").write_text(script)
    console_log = run_dir / "console.log"
    chosen = choose_accel(image, accel)
    cmd = qemu_command(image, share, repo, chosen, memory_mb, cpus)
    (run_dir / "qemu-command").write_text(" ".join(cmd) + "\n")

    with _one_vm_at_a_time(progress):
        if progress is not None:
            progress.write(f"vmrun: booting {image.kernel_release} ({chosen}, {cpus} cpus, {memory_mb} MiB); "
                           f"console: {console_log}\n")
            progress.flush()
        start = time.monotonic()
        boot_s = None
        lockup, next_look = LockupWatch(console_log), start + 5.0
        with open(console_log, "wb") as console:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
            try:
                while proc.poll() is None:
                    now = time.monotonic()
                    if boot_s is None and (share / "started").exists():
                        boot_s = now - start
                        if progress is not None:
                            progress.write(f"vmrun: guest up after {boot_s:.1f} s, running the script\n")
                            progress.flush()
                    if now >= next_look:
                        next_look = now + 5.0
                        why = lockup.check()
                        if why:
                            raise GuestLockup(f"guest kernel locked up ({why}); console: {console_log}",
                                              _tail(console_log))
                    if now - start > timeout_s:
                        raise VMError(
                            f"VM timed out after {timeout_s:.0f} s "
                            f"({'script still running' if boot_s else 'guest never started the script'}); "
                            f"console: {console_log}",
                            _tail(console_log)
                            + (f"\n--- guest stdout (tail) ---\n{_tail(share / 'stdout')}" if boot_s else ""),
                        )
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        wall_s = time.monotonic() - start

    exit_file = share / "exit-code"
    if not exit_file.exists():
        raise VMError(
            f"VM exited (QEMU status {proc.returncode}) without the script's exit code; console: {console_log}",
            _tail(console_log),
        )
    uptime = None
    with contextlib.suppress(OSError, ValueError):
        uptime = float((share / "started").read_text())
    return Result(
        exit_code=int(exit_file.read_text().strip()),
        stdout=(share / "stdout").read_text(errors="replace") if (share / "stdout").exists() else "",
        stderr=(share / "stderr").read_text(errors="replace") if (share / "stderr").exists() else "",
        share=share,
        console_log=console_log,
        accel=chosen,
        boot_s=boot_s,
        guest_uptime_s=uptime,
        wall_s=wall_s,
    )


def shell(image: Image, repo: Optional[Path] = REPO, accel: str = "auto", memory_mb: int = 3072, cpus: int = 2) -> int:
    """Boot the VM with the serial console on this terminal (root, no script run)."""
    with tempfile.TemporaryDirectory(prefix="stallscope-vm-shell-") as tmp:
        cmd = qemu_command(image, Path(tmp), repo, choose_accel(image, accel), memory_mb, cpus)
        with _one_vm_at_a_time(sys.stderr):
            print("vmrun: serial console follows; log in is automatic; Ctrl-a x quits QEMU", file=sys.stderr)
            return subprocess.call(cmd, preexec_fn=_die_with_parent)


# ---------------------------------------------------------------------------- cli


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a script in the stallscope test VM (QEMU, headless) and exit with its status "
        f"({VM_FAILED_EXIT} when the VM itself fails).",
        epilog="examples:\n"
        "  vmrun.py 'uname -r; stallscope-rxe-up; ibv_devices'\n"
        "  vmrun.py --script t.sh --out /tmp/run1 --timeout 300\n"
        "  vmrun.py --kernel 6.12 'uname -r'\n"
        "  vmrun.py --shell",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("command", nargs="?", help="bash command line to run in the guest")
    what.add_argument("--script", type=Path, help="bash script file to run in the guest")
    what.add_argument("--shell", action="store_true", help="interactive serial console instead of a script")
    parser.add_argument("--repo", type=Path, default=REPO, help="directory shared read-only at /stallscope "
                        "(default: this checkout)")
    parser.add_argument("--no-repo", action="store_true", help="share no repository")
    parser.add_argument("--out", type=Path, help="run directory (default: a new temporary one, kept)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for boot + script (default 900)")
    parser.add_argument("--kernel", default=DEFAULT_SUITE, metavar="SERIES|SUITE",
                        help=f"which image: kernel series {', '.join(KERNELS)} or its Debian suite "
                        f"(default {DEFAULT_SUITE})")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--memory", type=int, default=3072, help="guest memory in MiB (default 3072)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    args = parser.parse_args(argv)
    repo = None if args.no_repo else args.repo.resolve()

    try:
        image = build_image(suite=suite_of(args.kernel))
        if args.shell:
            return shell(image, repo, args.accel, args.memory, args.cpus)
        script = args.script.read_text() if args.script else args.command + "\n"
        run_dir = args.out or Path(tempfile.mkdtemp(prefix="stallscope-vmrun-"))
        result = run(script, image=image, run_dir=run_dir, repo=repo, timeout_s=args.timeout,
                     accel=args.accel, memory_mb=args.memory, cpus=args.cpus, progress=sys.stderr)
    except VMError as e:
        if e.detail:
            print(e.detail, file=sys.stderr)
        print(f"vmrun: error: {e}", file=sys.stderr)
        return VM_FAILED_EXIT
    except OSError as e:
        print(f"vmrun: error: {e}", file=sys.stderr)
        return VM_FAILED_EXIT
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    boot = f"{result.boot_s:.1f} s" if result.boot_s is not None else "?"
    print(f"vmrun: exit {result.exit_code}; boot-to-script {boot}, full cycle {result.wall_s:.1f} s "
          f"({result.accel}); run directory {run_dir}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

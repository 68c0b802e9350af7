"""Least privilege for the tracer: once the probes are loaded and attached, keep only the
capabilities the running agent still uses and drop every other one from the effective,
permitted, inheritable, ambient and bounding sets; then set no_new_privs, so nothing the
process could exec gains them back.

What the agent needs after start-up (found by running it with each one removed, kernel 6.18):

- ``CAP_SYS_PTRACE`` and ``CAP_DAC_READ_SEARCH``: /proc/<pid>/environ (job and rank), maps
  (the file behind a page fault) and fd/ (socket owners) of processes of other users are
  ptrace-checked and mode 0400/0500, owned by that user; /proc/<pid>/stat and cgroup are
  world-readable.
- nothing for the BPF side on kernels from 6.5: map lookups, updates and BPF_PROG_TEST_RUN
  (the sched family's flush) on fds the process holds are checked when the map or program is
  made, not on use. On 5.8-6.4 with ``kernel.unprivileged_bpf_disabled`` set, every bpf(2)
  call needs ``CAP_BPF``; before 5.8, ``CAP_SYS_ADMIN``: those are then kept.
- nothing for attaching, except the http family's TLS uprobes, attached per GPU owner
  process as owners appear: with it loaded, ``CAP_SYS_ADMIN`` is kept (its ``runtime_caps``;
  CAP_PERFMON + CAP_BPF alone get EINVAL from BCC 0.26's uprobe attach on 6.18; the
  programs are loaded before the drop). ``--families`` without http keeps the tight set. Other owners found later are added to a BPF map (sched's ``owners``).
- ``CAP_SYSLOG`` only to read kernel symbol addresses from /proc/kallsyms when
  ``kptr_restrict``/``perf_event_paranoid`` hide them; the sched family's symbol table is
  read before the drop instead, so it is not kept.
- nothing for NVML (the /dev/nvidia* files are opened at start and are mode 0666), RDMA
  counters (sysfs), ZeroMQ, or files the agent opened before (a recording, a store).

The process keeps uid 0: its own files (a store's journal, tracefs for BCC's clean-up at exit)
stay writable. Loading needs more (CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE for the memlock
limit on kernels before 5.11, CAP_SYS_ADMIN for some program types and BTF; or root before
5.8): see docs.

ctypes and libc only (capget/capset/prctl), no new dependency.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import re

from .families import BY_NAME

#: capability numbers (linux/capability.h)
CAPS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
NAMES = {v: k for k, v in CAPS.items()}

_VERSION_3 = 0x20080522
_PR_CAPBSET_READ, _PR_CAPBSET_DROP = 23, 24
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(CAPS.values())


def get_caps(pid: int = 0) -> tuple:
    """(effective, permitted, inheritable) of a process as bit masks (capget(2))."""
    hdr = _Header(_VERSION_3, pid)
    data = (_Data * 2)()
    if _lib().capget(ctypes.byref(hdr), data) != 0:
        raise _err("capget")
    join = lambda f: getattr(data[0], f) | (getattr(data[1], f) << 32)  # noqa: E731
    return join("effective"), join("permitted"), join("inheritable")


def status_caps(pid: int | str = "self", proc: str = "/proc") -> dict:
    """CapEff, CapPrm, CapBnd, CapAmb, CapInh and NoNewPrivs from /proc/<pid>/status."""
    out = {}
    with open(os.path.join(proc, str(pid), "status")) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.startswith("Cap"):
                out[k] = int(v.strip(), 16)
            elif k == "NoNewPrivs":
                out[k] = int(v.strip())
    return out


def names(mask: int) -> list:
    return [NAMES.get(i, f"cap{i}") for i in range(64) if mask >> i & 1]


def mask_of(caps) -> int:
    m = 0
    for c in caps:
        m |= 1 << (CAPS[c] if isinstance(c, str) else int(c))
    return m


def _kver(release: str) -> tuple:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _sysctl(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/kernel/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def runtime_needs(release: str | None = None, unprivileged_bpf_disabled: int | None = None) -> dict:
    """{capability name: why} that a started agent still needs on this kernel."""
    release = release or platform.release()
    unpriv = _sysctl("unprivileged_bpf_disabled", 2) if unprivileged_bpf_disabled is None \
        else unprivileged_bpf_disabled
    need = {"CAP_SYS_PTRACE": "/proc/<pid>/environ, maps, fd of other users' processes",
            "CAP_DAC_READ_SEARCH": "those files are mode 0400/0500, owned by the process's user"}
    kv = _kver(release)
    if unpriv and kv < (6, 5):
        if kv >= (5, 8):
            need["CAP_BPF"] = f"kernel {release} < 6.5 checks every bpf(2) call (map reads, flush)"
        else:
            need["CAP_SYS_ADMIN"] = f"kernel {release} < 5.8 has no CAP_BPF; every bpf(2) call is checked"
    return need


@dataclasses.dataclass
class DropResult:
    kept: list                      # capability names still effective
    dropped: list                   # names removed from the permitted set
    bounding_dropped: int           # how many left the bounding set
    no_new_privs: bool
    reasons: dict                   # kept name -> why
    error: str = ""                 # what could not be done (the rest was)

    def line(self) -> str:
        s = (f"privileges: kept {', '.join(self.kept) or 'no capability'}; dropped {len(self.dropped)} "
             f"(bounding set {self.bounding_dropped}); no_new_privs={'on' if self.no_new_privs else 'off'}")
        return s + (f"; {self.error}" if self.error else "")


def drop_to(keep: dict) -> DropResult:
    """Keep only ``keep`` (name -> reason) of what the process has, in every set; clear the
    inheritable and ambient sets; set no_new_privs. Raises nothing: what failed is in
    ``error`` (e.g. no CAP_SETPCAP: the bounding set stays as it was)."""
    errors = []
    eff, prm, _inh = get_caps()
    want = mask_of(keep) & prm
    top = last_cap()
    bnd_dropped = 0
    if eff >> CAPS["CAP_SETPCAP"] & 1:              # the bounding set needs CAP_SETPCAP, so first
        for cap in range(top + 1):
            if want >> cap & 1 or _lib().prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) != 1:
                continue
            if _lib().prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
                bnd_dropped += 1
            else:
                errors.append(str(_err(f"PR_CAPBSET_DROP {NAMES.get(cap, cap)}")))
                break
    else:
        errors.append("no CAP_SETPCAP: bounding set unchanged")
    if _lib().prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        errors.append(str(_err("PR_CAP_AMBIENT_CLEAR_ALL")))
    hdr = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = data[i].permitted = (want >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = 0
    if _lib().capset(ctypes.byref(hdr), data) != 0:
        errors.append(str(_err("capset")))
    nnp = _lib().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    if not nnp:
        errors.append(str(_err("PR_SET_NO_NEW_PRIVS")))
    eff2, prm2, _ = get_caps()
    return DropResult(kept=names(eff2), dropped=names(prm & ~prm2), bounding_dropped=bnd_dropped,
                      no_new_privs=nnp, reasons={k: v for k, v in keep.items() if eff2 >> CAPS[k] & 1},
                      error="; ".join(errors))


def preload_kernel_symbols(families) -> str:
    """Read the kernel symbol table now (BCC reads /proc/kallsyms once, on first use), while
    CAP_SYSLOG still shows its addresses: the sched family names where threads blocked."""
    if "sched" not in families:
        return ""
    try:
        from bcc import BPF
        BPF.ksymname(b"schedule")
    except Exception as e:          # BCC's own errors: the names degrade, tracing goes on
        return f"kernel symbols not preloaded ({type(e).__name__}: {e})"
    return ""


def drop_after_start(agent, log=None) -> DropResult | None:
    """Drop what a started agent no longer needs; log one line with what was kept. Off with
    STALLSCOPE_KEEP_PRIVILEGES=1 (debugging). None when off or not privileged to begin with."""
    log = log or agent.log
    if os.environ.get("STALLSCOPE_KEEP_PRIVILEGES") == "1":
        log("privileges: kept all (STALLSCOPE_KEEP_PRIVILEGES=1)")
        return None
    try:
        if not get_caps()[1]:
            return None
    except OSError as e:
        log(f"privileges: not dropped: {e}")
        return None
    note = preload_kernel_symbols({p.family for p in agent.loaded})
    need = runtime_needs()
    for p in agent.loaded:                  # a family that attaches after start says what it needs
        need.update(getattr(BY_NAME.get(p.family), "runtime_caps", lambda _p: {})(p))
    res = drop_to(need)
    if note:
        res.error = "; ".join(x for x in (res.error, note) if x)
    log(res.line())
    return res

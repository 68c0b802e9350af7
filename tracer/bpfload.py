"""Compiling and attaching BPF programs with BCC: what every probe family shares.

A family module (tracer/families/) calls :func:`load_bpf` with its own extra
``-D`` flags; :func:`base_cflags` turns the probe config and the running
kernel's BTF offsets into the flags every program gets.
"""

from __future__ import annotations

import os

from stallscope.bpf import BPF_DIR

from . import btf


class ProbeError(RuntimeError):
    """A probe family could not be loaded; the message is one line."""


def source_text(family: str) -> str:
    parts = []
    for name in ("common.bpf.h", f"{family}.bpf.c"):
        path = os.path.join(BPF_DIR, name)
        with open(path) as f:
            parts.append(f'#line 1 "{path}"\n{f.read()}')
    # BCC rewrites map calls (events.ringbuf_reserve(...)) only in the main
    # file, so the shared header is placed into the text rather than #included.
    return "\n".join(parts)


def base_cflags(cfg) -> list:
    """The -D flags every family gets: threshold, filters, ring size, BTF offsets."""
    return [f"-I{BPF_DIR}", f"-DSS_MIN_NS={int(cfg.min_latency_ns)}ULL",
            f"-DSS_FILTER_PID={int(cfg.pid)}", f"-DSS_FILTER_CGROUP={int(cfg.cgroup_id)}ULL",
            f"-DSS_RINGBUF_PAGES={int(cfg.ringbuf_pages)}",
            *btf.offset_cflags(), *cfg.extra_cflags]


class DumpOnly(BaseException):
    """What :func:`load_bpf` would have compiled, raised instead under :func:`dumping`
    (for --dump-bpf). A BaseException, so a family's ``except Exception`` fallbacks let it
    through to the caller."""

    def __init__(self, family: str, cflags: list, text: str | None):
        super().__init__(family)
        self.family, self.cflags, self.text = family, list(cflags), text


_DUMPING = False


class dumping:
    """Within it, :func:`load_bpf` raises :class:`DumpOnly` instead of compiling."""

    def __enter__(self):
        global _DUMPING
        _DUMPING = True

    def __exit__(self, *exc):
        global _DUMPING
        _DUMPING = False
        return False


def load_bpf(family: str, cflags: list, text: str | None = None):
    if _DUMPING:
        raise DumpOnly(family, cflags, text)
    from bcc import BPF
    return BPF(text=(text or source_text(family)).encode(), cflags=cflags)


class quiet_stderr:
    """Silence fd 2 (C libraries write there directly) for a capability probe."""

    def __enter__(self):
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


_FENTRY_OK = None


def fentry_works() -> tuple:
    """Try a trivial fentry program once: (ok, reason). BCC's support_kfunc()
    only checks BTF; hosts that block ftrace trampolines fail at attach."""
    global _FENTRY_OK
    if _FENTRY_OK is None:
        try:
            from bcc import BPF
            if not BPF.support_kfunc():
                _FENTRY_OK = (False, "kernel lacks BTF trampolines (fentry)")
            else:
                with quiet_stderr():      # libbpf prints the expected EPERM itself
                    # one named argument: BCC 0.18's KFUNC_PROBE (Debian 11) fails to compile without
                    b = BPF(text=b"KFUNC_PROBE(vfs_read, void *file) { return 0; }")
                b.cleanup()
                _FENTRY_OK = (True, "")
        except Exception as e:
            msg = str(e).splitlines()[-1] if str(e) else type(e).__name__
            if "super-user" in msg or "ermission" in msg:      # BCC's words for EPERM
                msg = "EPERM (BPF trampolines/ftrace blocked on this kernel)"
            _FENTRY_OK = (False, f"fentry attach failed: {msg}")
    return _FENTRY_OK


def fentry_targets(names, btf_path: str = btf.BTF_PATH, kallsyms: str = "/proc/kallsyms") -> tuple:
    """Which of ``names`` fentry can attach to on this kernel: (present, {name: why not}).

    A trampoline needs the function in the kernel's BTF (a FUNC record: a static
    function the compiler inlined everywhere has none) and as a symbol in kallsyms
    (its own text to patch). Checked per name, so a function missing or inlined on one
    kernel costs that function only (see :func:`load_optional`)."""
    names = list(names)
    try:
        funcs = btf.Btf(btf_path, funcs=True).funcs
    except btf.BtfError as e:
        return [], {n: str(e) for n in names}
    syms = kallsyms_present(names, kallsyms)
    present, missing = [], {}
    for n in names:
        if n not in funcs:
            missing[n] = "not in the kernel's BTF (inlined or absent)"
        elif n not in syms:
            missing[n] = "not in /proc/kallsyms (inlined)"
        else:
            present.append(n)
    return present, missing


def _kfunc_key(fds: dict, prefix: str, name: str):
    """The key BCC keeps ``name``'s program under in ``fds``: ``<prefix>__<name>`` (BCC 0.18)
    or ``<prefix>__<module>__<name>`` (later BCC: ``kfunc__vmlinux__vfs_read``); None if absent."""
    plain, tail = f"{prefix}__{name}".encode(), f"__{name}".encode()
    for k in fds:
        if k == plain or (k.startswith(f"{prefix}__".encode()) and k.endswith(tail)
                          and len(k) > len(plain)):
            return k
    return None


def kfuncs_unattached(b, names) -> dict:
    """Which of ``names`` BCC did not attach both fentry and fexit programs to: {name: why}.

    BCC attaches ``kfunc__[<module>__]<name>``/``kretfunc__...`` itself while loading; a version
    that skips one of a pair (BCC 0.18 attached only the entry program of a pair one macro
    line expanded to) leaves entries that never see their return. Read from the link fds BCC
    keeps, so a family reports what is attached rather than what it compiled; a BCC that keeps
    no such record cannot be checked, and nothing is reported then."""
    if not hasattr(b, "kfunc_entry_fds") or not hasattr(b, "kfunc_exit_fds"):
        return {}
    out = {}
    for n in names:
        has_entry = _kfunc_key(b.kfunc_entry_fds, "kfunc", n) is not None
        has_exit = _kfunc_key(b.kfunc_exit_fds, "kretfunc", n) is not None
        if not (has_entry and has_exit):
            half = "fentry" if has_entry else "fexit" if has_exit else ""
            out[n] = f"BCC attached {half} only" if half else "BCC attached neither fentry nor fexit"
    return out


def detach_kfuncs(b, names) -> None:
    """Detach whatever half of each of ``names``' fentry/fexit pair is attached."""
    for n in names:
        k = _kfunc_key(getattr(b, "kfunc_entry_fds", {}), "kfunc", n)
        if k is not None:
            b.detach_kfunc(fn_name=k)
        k = _kfunc_key(getattr(b, "kfunc_exit_fds", {}), "kretfunc", n)
        if k is not None:
            b.detach_kretfunc(fn_name=k)


def load_optional(load, flag_of, present, missing: dict) -> tuple:
    """Load a program whose optional attach targets ``present`` each add ``flag_of(name)``.

    ``load(flags)`` compiles and attaches. When it fails with optional targets in,
    it is tried once more without them: the failure (a target that passed the
    checks but cannot be attached) costs the optional targets, with the reason
    recorded in ``missing``, not the family. Returns (BPF object, attached, missing)."""
    missing = dict(missing)
    try:
        return load([flag_of(n) for n in present]), list(present), missing
    except Exception as e:
        if not present:
            raise
        msg = str(e).strip().splitlines()
        why = f"attach failed: {msg[-1] if msg else type(e).__name__}"
        missing.update({n: why for n in present})
    return load([]), [], missing


def tp_exists(tracefs: str, tp: str) -> bool:
    return os.path.isdir(os.path.join(tracefs, "events", tp))


def tp_has_field(tracefs: str, tp: str, field: str) -> bool:
    try:
        with open(os.path.join(tracefs, "events", tp, "format")) as f:
            return f" {field};" in f.read()
    except OSError:
        return False


def kallsyms_present(names, path: str = "/proc/kallsyms") -> set:
    """Which of ``names`` are functions the kernel (or a loaded module) has; one pass."""
    want, found = set(names), set()
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2] in want:
                    found.add(parts[2])
    except OSError:
        pass
    return found

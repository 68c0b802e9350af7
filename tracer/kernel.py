"""What the running kernel and this host offer the tracer, checked up front.

Every check turns a missing capability into :class:`Unavailable` with one line
that says what to do, so the CLI can print it and exit 1 instead of showing a
traceback from deep inside BCC.
"""

from __future__ import annotations

import glob
import os
import platform
import re

CACHE_DIR = os.environ.get("STALLSCOPE_CACHE", "/var/cache/stallscope")


class Unavailable(RuntimeError):
    """A capability the tracer needs is missing; the message is one line."""


def tracefs_root() -> str:
    """Mounted tracefs (mounting it if needed); STALLSCOPE_TRACEFS overrides the path."""
    forced = os.environ.get("STALLSCOPE_TRACEFS")
    cands = [forced] if forced else ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
    for c in cands:
        if os.path.isdir(os.path.join(c, "events")):
            return c
    if not forced and os.path.isdir("/sys/kernel/tracing"):
        rc = os.system("mount -t tracefs nodev /sys/kernel/tracing >/dev/null 2>&1")
        if rc == 0 and os.path.isdir("/sys/kernel/tracing/events"):
            return "/sys/kernel/tracing"
    raise Unavailable(f"tracefs not found at {' or '.join(cands)} and could not be mounted "
                      "(try: mount -t tracefs nodev /sys/kernel/tracing)")


def require_root():
    if os.geteuid() != 0:
        raise Unavailable("stallscope trace needs root (loading BPF programs needs CAP_BPF and "
                          "CAP_PERFMON): run it with sudo")


def import_bcc():
    """Import BCC's Python module; raise Unavailable with the install hint."""
    try:
        import bcc  # noqa: F401
        from bcc import BPF  # noqa: F401
        return bcc
    except Exception as e:  # ImportError, or libbcc.so failing to load
        raise Unavailable(f"BCC is not usable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); "
                          "install it from the distribution: apt install python3-bpfcc "
                          "(the PyPI package named bcc is unrelated)") from e


def _kver(name: str):
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", name)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def ensure_headers(release: str | None = None, src_root: str = "/usr/src",
                   cache_dir: str = CACHE_DIR) -> str:
    """Make BCC find kernel headers; return a one-line description of what is used.

    Order: BCC_KERNEL_SOURCE if set; the running kernel's own headers
    (/lib/modules/<release>/build); the kernel's built-in headers
    (/sys/kernel/kheaders.tar.xz, CONFIG_IKHEADERS, which BCC extracts itself);
    otherwise the newest installed headers, merging Debian's split
    linux-headers-<v>-common and -<arch> packages into a symlink farm. Struct
    offsets never come from these headers (see tracer/btf.py), so a version
    mismatch is safe for the probes.
    """
    release = release or platform.release()
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return f"headers from BCC_KERNEL_SOURCE={os.environ['BCC_KERNEL_SOURCE']}"
    own = f"/lib/modules/{release}/build"
    if os.path.isfile(os.path.join(own, "include/generated/autoconf.h")) or \
            os.path.isdir(os.path.join(own, "include/config")):
        return f"headers for the running kernel ({own})"
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "headers built into the kernel (/sys/kernel/kheaders.tar.xz)"
    commons = sorted(glob.glob(os.path.join(src_root, "linux-headers-*-common")), key=_kver)
    for common in reversed(commons):
        prefix = common[: -len("common")]
        arches = [d for d in glob.glob(prefix + "*") if d != common and os.path.isdir(d)]
        if not arches:
            continue
        arch = sorted(arches)[0]
        dest = os.path.join(cache_dir, "kheaders", os.path.basename(arch))
        if not os.path.isdir(os.path.join(dest, "include")):
            tmp = dest + ".tmp"
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            rc = os.system(f"rm -rf '{tmp}' && mkdir -p '{tmp}' && cp -rs '{common}/.' '{tmp}/' && "
                           f"cp -rsf '{arch}/.' '{tmp}/' && rm -rf '{dest}' && mv '{tmp}' '{dest}'")
            if rc != 0:
                raise Unavailable(f"could not merge kernel headers {common} + {arch} into {dest}")
        os.environ["BCC_KERNEL_SOURCE"] = dest
        return (f"no headers for kernel {release}; using {os.path.basename(arch)} "
                f"(merged in {dest}; struct offsets come from BTF)")
    others = sorted((d for d in glob.glob(os.path.join(src_root, "linux-headers-*"))
                     if os.path.isfile(os.path.join(d, "include/generated/autoconf.h"))), key=_kver)
    if others:
        os.environ["BCC_KERNEL_SOURCE"] = others[-1]
        return f"no headers for kernel {release}; using {others[-1]} (struct offsets come from BTF)"
    raise Unavailable(f"no kernel headers found for {release}: install linux-headers-{release} "
                      "(Debian/Ubuntu: apt install linux-headers-$(uname -r), or linux-headers-amd64)")


def has_kprobes(tracefs: str) -> bool:
    return os.path.exists(os.path.join(tracefs, "kprobe_events"))


#: a probe event BCC registered through tracefs (kretprobes with maxactive, and every probe on
#: kernels without perf's kprobe PMU): "<p|r>[maxactive]:<group>/<name>_bcc_<pid> <target>"
_BCC_EVENT = re.compile(r"^[pr]\d*:(?P<event>(?:kprobes|uprobes)/\S+_bcc_(?P<pid>\d+))\s")


def remove_stale_bcc_probes(tracefs: str, alive=lambda pid: os.path.exists(f"/proc/{pid}")) -> tuple:
    """Remove the probe events a BCC process left registered when it died without cleaning up
    (SIGKILL, OOM): its pid, in the event's name, no longer runs. Each keeps its kretprobe
    instances (up to 4,096 of them) allocated for good. An event still in use cannot be
    removed (the kernel answers EBUSY) and is left. Returns (removed event names, "name (why)"
    of those that could not be)."""
    removed, failed = [], []
    for kind in ("kprobe_events", "uprobe_events"):
        path = os.path.join(tracefs, kind)
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = _BCC_EVENT.match(line)
            if not m or alive(int(m.group("pid"))):
                continue
            try:
                # O_APPEND: opening it truncated removes every event. Not open(path, "a"): Python
                # seeks to the end of a file opened so, and tracefs answers that with EINVAL.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, f"-:{m.group('event')}\n".encode())
                finally:
                    os.close(fd)
                removed.append(m.group("event"))
            except OSError as e:
                failed.append(f"{m.group('event')} ({e.strerror or e})")
    return removed, failed


def kernel_has_symbol(name: str) -> bool:
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == name:
                    return True
    except OSError:
        pass
    return False

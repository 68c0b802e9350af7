"""The http family (bpf/http.bpf.c): HTTP/1.x requests, from head written to final status.

Plaintext requests come from syscall tracepoints for every process; TLS requests from
uprobes on the libssl each GPU owner process (and each descendant) actually maps, attached
per process by :class:`TlsAttacher` as owners appear (the agent calls ``tick`` with the
owner pids, about once a second). Processes that are not owners get no uprobe at all: the
kernel installs a per-process uprobe's breakpoint only in that process.

One row per request (``http`` table, count 1); retries become episodes in the analysis
(analysis/http_episodes.py).
"""

from __future__ import annotations

import os

import numpy as np

from stallscope.tracer import uprobe_sites
from stallscope.tracer.bpfload import ProbeError, base_cflags, load_bpf, tp_exists
from stallscope.tracer.decode import comm_str, unique_map
from stallscope.wire.schema import DEFINES, ENUMS, T_HTTP

NAME = "http"
RECORD_TYPES = (T_HTTP,)
#: opt-in (``--families ...,http``): its plaintext path puts a program on every read and write
#: of every process, whose cost is not yet shown within the goal (README, "API calls")
DEFAULT = False
SYSCALLS = ("write", "sendto", "writev", "sendmsg", "read", "recvfrom", "readv", "recvmsg")
TRACEPOINTS = tuple(f"syscalls/sys_{d}_{s}" for s in SYSCALLS for d in ("enter", "exit")
                    if d == "enter" or s in ("read", "recvfrom", "readv", "recvmsg")) \
    + ("syscalls/sys_enter_close",)

F_TLS = DEFINES["SS_F_HTTP_TLS"]
F_NOANSWER = DEFINES["SS_F_HTTP_NOANSWER"]
HOST_LEN = DEFINES["SS_HTTP_HOST_LEN"]
PATH_OFF, PATH_LEN = DEFINES["SS_HTTP_PATH_OFF"], DEFINES["SS_HTTP_PATH_LEN"]
REASON_OFF, REASON_LEN = DEFINES["SS_HTTP_REASON_OFF"], DEFINES["SS_HTTP_REASON_LEN"]
#: op code -> method
METHODS = {v: k[len("SS_OP_HTTP_"):] for k, v in ENUMS.items() if k.startswith("SS_OP_HTTP_")}

#: libraries probed for TLS, and the exported functions whose emulated callee is attached
LIBSSL = r"^libssl\.so"
WRITE_SYMS = ("SSL_write_ex", "SSL_write")
READ_SYMS = ("SSL_read_ex", "SSL_read")


def methods(cfg, tracefs):
    def tracepoint():
        missing = [tp for tp in TRACEPOINTS if not tp_exists(tracefs, tp)]
        if missing:
            raise ProbeError(f"tracepoint {missing[0]} not found")
        flags = ["-DSS_HTTP_TLS"] if uprobe_sites.is_x86_64() else []
        b = load_bpf(NAME, base_cflags(cfg) + flags)
        if flags:                 # loaded now: attaching later needs no right to load programs
            from bcc import BPF
            for fn in (b"ss_tls_write", b"ss_tls_read", b"ss_tls_read_ret"):
                b.load_func(fn, BPF.KPROBE)
        tls = "TLS: libssl uprobes per GPU owner process" if flags else "no TLS (x86-64 only)"
        return b, "syscall tracepoints " + " ".join(SYSCALLS) + f" close; {tls}"
    return [("tracepoint", tracepoint)]


def runtime_caps(probe) -> dict:
    """Capabilities the agent keeps after start-up with this family loaded (tracer/privileges.py):
    attaching a uprobe as a GPU owner appears. CAP_SYS_ADMIN: with CAP_PERFMON (+ CAP_BPF)
    alone, BCC 0.26's attach_uprobe fails with EINVAL on 6.18 (measured)."""
    if "libssl" not in probe.detail:
        return {}
    return {"CAP_SYS_ADMIN": "http: TLS uprobes attached per GPU owner process as owners appear"}


def _field(raw: np.ndarray, off: int, n: int) -> np.ndarray:
    return np.ascontiguousarray(raw[:, off:off + n]).view(f"S{n}").ravel()


def _text(b: bytes) -> str:
    return comm_str(b)


def decode(rtype, r, base, method) -> dict:
    n = len(r)
    raw = np.ascontiguousarray(r["path"]).view(np.uint8).reshape(n, -1)
    status = np.where((r["flags"] & F_NOANSWER) != 0, 0, r["ret"]).astype(np.uint64)
    op = unique_map(r["op"], lambda c: METHODS.get(int(c), str(int(c))))
    return {"http": {**base, "op": op,
                     "host": unique_map(_field(raw, 0, HOST_LEN), _text),
                     "path": unique_map(_field(raw, PATH_OFF, PATH_LEN), _text),
                     "status": status,
                     "reason": unique_map(_field(raw, REASON_OFF, REASON_LEN), _text),
                     "statuses": unique_map(status, lambda s: str(int(s))),
                     "count": np.ones(n, dtype=np.uint64),
                     "blocked_ns": np.asarray(base["dur_ns"], dtype=np.uint64),
                     "backoff_ns": np.zeros(n, dtype=np.uint64),
                     "tls": ((r["flags"] & F_TLS) != 0).astype(np.uint64),
                     "conn": r["key"].astype(np.uint64),
                     "cgroup": r["cgroup_id"].astype(np.uint64)}}


class TlsAttacher:
    """Per-process uprobes on the libssl that each owner process maps.

    ``tick(pids)`` attaches to every pid in ``pids`` that maps a libssl not attached yet for
    it (a process may import ssl late: it is looked at again on every tick) and detaches
    pids that are gone or no longer owners. Attach sites are resolved once per library file
    (device, inode) with :func:`uprobe_sites.emulated_site`; a library whose functions have
    no emulated site is still attached at the exported symbol, with a one-time warning.
    """

    def __init__(self, bpf, log=lambda m: None, proc: str = "/proc"):
        self.bpf = bpf
        self.log = log
        self.proc = proc
        self.sites = {}          # (dev, inode) -> (write vaddrs, read vaddrs) or an error string
        self.attached = {}       # pid -> {(dev, inode): (path, write vaddrs, read vaddrs)}
        self.errors = 0
        self._warned = set()

    def _resolve(self, m: uprobe_sites.Mapping, pid: int):
        key = (m.dev, m.inode)
        got = self.sites.get(key)
        if got is None:
            try:
                elf = uprobe_sites.Elf(uprobe_sites.host_path(pid, m.path, self.proc))
                syms = elf.symbols()
                got = tuple(self._sites_of(elf, syms, names) for names in (WRITE_SYMS, READ_SYMS))
                if not got[0] or not got[1]:
                    got = f"{m.path}: no {'/'.join(WRITE_SYMS + READ_SYMS)} symbols"
            except (OSError, uprobe_sites.SiteError, ValueError, IndexError) as e:
                got = f"{m.path}: {e}"
            self.sites[key] = got
        return got

    def _sites_of(self, elf, syms, names) -> tuple:
        out = []
        for name in names:
            if name not in syms:
                continue
            try:
                site = uprobe_sites.emulated_site(elf, name, syms)
            except uprobe_sites.SiteError as e:
                if elf.path not in self._warned:
                    self._warned.add(elf.path)
                    self.log(f"http: {e}; attaching at {name} itself (single-stepped: ~10 us a call)")
                site = uprobe_sites.Site(elf.path, name, syms[name][0], "other", "symbol")
            if site.vaddr not in out:
                out.append(site.vaddr)
        return tuple(out)

    def tick(self, pids) -> None:
        want = {int(p) for p in pids if int(p) > 0}
        for pid in list(self.attached):
            if pid not in want or not os.path.exists(os.path.join(self.proc, str(pid))):
                self._detach(pid)
        for pid in sorted(want):
            have = self.attached.setdefault(pid, {})
            for m in uprobe_sites.mapped_libs(pid, LIBSSL, self.proc):
                if (m.dev, m.inode) in have:
                    continue
                got = self._resolve(m, pid)
                if isinstance(got, str):
                    if got not in self._warned:
                        self._warned.add(got)
                        self.log(f"http: TLS not traced for {got}")
                    have[(m.dev, m.inode)] = None
                    continue
                path = uprobe_sites.host_path(pid, m.path, self.proc).encode()
                try:
                    for a in got[0]:
                        self.bpf.attach_uprobe(name=path, addr=a, fn_name=b"ss_tls_write", pid=pid)
                    for a in got[1]:
                        self.bpf.attach_uprobe(name=path, addr=a, fn_name=b"ss_tls_read", pid=pid)
                        self.bpf.attach_uretprobe(name=path, addr=a, fn_name=b"ss_tls_read_ret", pid=pid)
                except Exception as e:       # the process exited meanwhile, or uprobes refused
                    self.errors += 1
                    self.log(f"http: TLS uprobes on pid {pid} {m.path} failed: {e}")
                    have[(m.dev, m.inode)] = (path, got[0], got[1])
                    self._detach_one(pid, path, got)
                    have.pop((m.dev, m.inode), None)
                    continue
                have[(m.dev, m.inode)] = (path, got[0], got[1])
            if not have:
                self.attached.pop(pid, None)

    def _detach_one(self, pid, path, got):
        for a in got[0]:
            self._quiet(self.bpf.detach_uprobe, path, a, pid)
        for a in got[1]:
            self._quiet(self.bpf.detach_uprobe, path, a, pid)
            self._quiet(self.bpf.detach_uretprobe, path, a, pid)

    @staticmethod
    def _quiet(fn, path, addr, pid):
        try:
            fn(name=path, addr=addr, pid=pid)
        except Exception:
            pass                             # never attached (a partial attach) or already gone

    def _detach(self, pid: int) -> None:
        for got in (self.attached.pop(pid, None) or {}).values():
            if got is not None:
                self._detach_one(pid, got[0], (got[1], got[2]))

    def pids(self) -> list:
        """Processes with TLS uprobes attached now."""
        return sorted(p for p, libs in self.attached.items() if any(v is not None for v in libs.values()))

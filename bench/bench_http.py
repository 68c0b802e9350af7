"""What the http family costs the traced processes: per call, against the same loop unprobed
in the same run (these machines are shared and noisy: every figure is a same-run difference).

  plaintext  write(2) of 16 KiB that is not a request head, read(2) of 16 KiB (both on every
             process while the family is loaded), and a request head written to a socket
             (the full parse: method, path, Host)
  TLS        SSLObject.write / SSLObject.read of 256 B through memory BIOs (libssl's
             SSL_write_ex / SSL_read_ex, no syscall inside), with the family's per-process
             uprobes attached to this process, and attached to another process only (the
             cost for a process that is not a GPU owner: goal none)
  floor      the same TLS calls with an empty program on uprobes at the same addresses: what
             the kernel's uprobe mechanism alone costs on this machine (``*_over_floor_ns``:
             what the family's programs add on top)
  upload     CPU seconds a 1 GB TLS upload in 16 KiB writes pays (process CPU time with the
             uprobes attached minus without)

    python -m bench http [--quick]          # root; about 1.5 min (quick: 25 s)

Goals on the 2-core VM: <= 0.5 us per TLS write, <= 1 us per TLS read, no measurable cost for
non-owners. One JSON line per figure.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

CHUNK = 16 << 10
SMALL = 256          # TLS per-call figures: a small record, so the encryption's own run-to-run
                     # noise (microseconds at 16 KiB) does not swamp the probe's cost


def _per_call(fn, n: int, reps: int) -> float:
    """Median ns per call of fn() over reps runs of n calls."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


def _tls_pair(directory: str):
    """A client and a server SSLObject joined by memory BIOs, handshake done."""
    from tests.fixtures.httpfault import make_cert
    cert, key = make_cert(directory)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(cert)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = cctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    srv = sctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return cli, srv, c_out, s_in


def _load(log):
    from stallscope.tracer import kernel, probes
    kernel.require_root()
    kernel.import_bcc()
    kernel.ensure_headers()
    loaded, failed = probes.load(probes.ProbeConfig(families=("http",)), log)
    if not loaded:
        raise SystemExit(f"http family not loaded: {failed}")
    return loaded[0]


def _records(cli, c_out, data, n):
    """n TLS records of data, in order (each can be decrypted once, in sequence)."""
    out = []
    for _ in range(n):
        cli.write(data)
        out.append(c_out.read())
    return out


def _read_loop(srv, s_in, records):
    it = iter(records)

    def read():
        s_in.write(next(it))
        srv.read(CHUNK)
    return read


class _FloorProbe:
    """Uprobes that run an empty program at the family's TLS attach addresses of one process:
    ``on_write()`` (entry probes on the write sites), ``on_read()`` (entry + return probes on
    the read sites, as the family attaches them), ``off()``."""

    def __init__(self, path: bytes, w_addrs, r_addrs, pid: int):
        from bcc import BPF
        self.b = BPF(text="int ss_nothing(void *ctx) { return 0; }")
        self.path, self.w, self.r, self.pid = path, list(w_addrs), list(r_addrs), pid
        self.on = []

    def _attach(self, addrs, ret: bool):
        for a in addrs:
            self.b.attach_uprobe(name=self.path, addr=a, fn_name=b"ss_nothing", pid=self.pid)
            self.on.append((a, False))
            if ret:
                self.b.attach_uretprobe(name=self.path, addr=a, fn_name=b"ss_nothing", pid=self.pid)
                self.on.append((a, True))

    def on_write(self):
        self.off()
        self._attach(self.w, False)

    def on_read(self):
        self.off()
        self._attach(self.r, True)

    def off(self):
        for a, ret in self.on:
            (self.b.detach_uretprobe if ret else self.b.detach_uprobe)(name=self.path, addr=a, pid=self.pid)
        self.on = []

    def close(self):
        self.off()
        self.b.cleanup()


def main(quick: bool = False, argv=None):
    if os.geteuid() != 0:
        raise SystemExit("bench http needs root (BPF, uprobes)")
    n = 20_000 if quick else 100_000
    nr = n // 4                   # TLS calls per round
    reps = 5 if quick else 9
    rounds = 5 if quick else 15   # ABBA rounds of the TLS figures
    tmp = tempfile.mkdtemp(prefix="stallscope-bench-http-")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    devnull = os.open(os.devnull, os.O_WRONLY)
    zero = os.open("/dev/zero", os.O_RDONLY)
    a, b = socket.socketpair()
    body = b"\xa5" * CHUNK
    head = b"PUT /ckpt/step-900?partNumber=2 HTTP/1.1\r\nHost: s3.local:9000\r\nContent-Length: 0\r\n\r\n"

    def head_to_socket():
        a.send(head)
        b.recv(4096)

    plain = {"write_16k": lambda: os.write(devnull, body), "read_16k": lambda: os.read(zero, CHUNK),
             "request_head_socket": head_to_socket}
    cli, _srv, c_out, _s_in = _tls_pair(tmp)
    r_cli, r_srv, r_out, r_in = _tls_pair(tmp)   # reads: their own pair (records in sequence)
    data = b"\x5a" * CHUNK
    small = b"\x5a" * SMALL

    def write():
        cli.write(small)
        c_out.read()              # drop the ciphertext: the write alone is measured

    def reads():
        return _read_loop(r_srv, r_in, _records(r_cli, r_out, small, nr))

    base = {k: _per_call(f, n, reps) for k, f in plain.items()}
    base["tls_write_256b"] = _per_call(write, nr, reps)
    base["tls_read_256b"] = statistics.median(_per_call(reads(), nr, 1) for _ in range(reps))

    probe = _load(log)
    from stallscope.tracer.families.http import TlsAttacher
    tls = TlsAttacher(probe.bpf, log)
    other = subprocess.Popen([sys.executable, "-c", "import ssl, time; time.sleep(600)"])

    def attach(pids):
        tls.tick(pids)
        if tls.pids() != sorted(pids):
            raise SystemExit(f"TLS uprobes not attached to {pids}: {tls.pids()}")

    def ab_with(make, on, off) -> float:
        """Median over rounds of (ns per call with ``on()``) - (after ``off()``). A round runs
        base, probed, probed, base back to back (ABBA), so load drift on the machine cancels
        and neither side always runs first (the order alone moved a same-run difference by a
        microsecond or more here)."""
        diffs = []
        for _ in range(rounds):
            off()
            b0 = _per_call(make(), nr, 1)
            on()
            p0 = _per_call(make(), nr, 1)
            p1 = _per_call(make(), nr, 1)
            off()
            b1 = _per_call(make(), nr, 1)
            diffs.append((p0 + p1 - b0 - b1) / 2)
        return statistics.median(diffs)

    def ab(make, pids) -> float:
        """ab_with for the family's TLS uprobes on ``pids``."""
        return ab_with(make, lambda: attach(pids), lambda: attach([]))

    try:
        time.sleep(0.5)
        probed = {k: _per_call(f, n, reps) for k, f in plain.items()}
        me, them = [os.getpid()], [other.pid]
        added = {"tls_write_256b": ab(lambda: write, me), "tls_read_256b": ab(reads, me),
                 "tls_write_256b_non_owner": ab(lambda: write, them),
                 "tls_read_256b_non_owner": ab(reads, them)}
        # the floor: the kernel's own uprobe cost at the same addresses, a program that does
        # nothing (what any uprobe-based TLS tracer pays here before its first instruction)
        attach(me)
        (path, w_addrs, r_addrs), = [v for v in tls.attached[me[0]].values() if v]
        attach([])
        floor = _FloorProbe(path, w_addrs, r_addrs, me[0])
        added["tls_write_floor_bare_uprobe"] = ab_with(lambda: write, floor.on_write, floor.off)
        added["tls_read_floor_bare_uprobe_pair"] = ab_with(reads, floor.on_read, floor.off)
        floor.close()
        # a 1 GB upload in 16 KiB TLS writes: process CPU time, probed vs unprobed, alternating
        total = (256 if quick else 1024) << 20
        chunks = total // CHUNK

        def upload():
            t0 = time.process_time()
            for _ in range(chunks):
                cli.write(data)
                c_out.read()
            return time.process_time() - t0
        cpu = {"probed": [], "base": []}
        for _ in range(2):              # ABBA
            for side in ("base", "probed", "probed", "base"):
                attach(me if side == "probed" else [])
                cpu[side].append(upload())
    finally:
        other.kill()
        other.wait()
        tls.tick([])
        probe.close()
    out = []
    for k in plain:
        out.append({"bench": "http", "figure": f"{k}_added_ns", "value": round(probed[k] - base[k], 1),
                    "base_ns": round(base[k], 1), "probed_ns": round(probed[k], 1)})
    for k, v in added.items():
        kind = "tls_write_256b" if k.startswith("tls_write") else "tls_read_256b"
        out.append({"bench": "http", "figure": f"{k}_added_ns", "value": round(v, 1),
                    "base_ns": round(base[kind], 1)})
    for k, floor_k in (("tls_write_256b", "tls_write_floor_bare_uprobe"),
                       ("tls_read_256b", "tls_read_floor_bare_uprobe_pair")):
        out.append({"bench": "http", "figure": f"{k}_over_floor_ns", "value": round(added[k] - added[floor_k], 1),
                    "floor_ns": round(added[floor_k], 1)})
    scale = (1 << 30) / total
    out.append({"bench": "http", "figure": "tls_upload_1GB_added_cpu_s",
                "value": round((statistics.median(cpu["probed"]) - statistics.median(cpu["base"])) * scale, 3),
                "base_cpu_s": round(statistics.median(cpu["base"]) * scale, 3), "measured_bytes": total})
    for line in out:
        print(json.dumps(line), flush=True)
    return out


if __name__ == "__main__":
    main("--quick" in sys.argv)

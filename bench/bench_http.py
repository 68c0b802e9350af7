"""What the http family costs the traced processes: per call, against the same loop unprobed
in the same run (these machines are shared and noisy: every figure is a same-run difference).

  plaintext  write(2) of 16 KiB that is not a request head, read(2) of 16 KiB (both on every
             process while the family is loaded), and a request head written to a socket
             (the full parse: method, path, Host)
  TLS        SSLObject.write / SSLObject.read of 16 KiB through memory BIOs (libssl's
             SSL_write_ex / SSL_read_ex, no syscall inside), with the family's per-process
             uprobes attached to this process, and attached to another process only (the
             cost for a process that is not a GPU owner: goal none)
  upload     CPU seconds a 1 GB TLS upload in 16 KiB writes pays (process CPU time with the
             uprobes attached minus without)

    python -m bench http [--quick]          # root; about 1 min (quick: 20 s)

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


def main(quick: bool = False, argv=None):
    if os.geteuid() != 0:
        raise SystemExit("bench http needs root (BPF, uprobes)")
    n = 20_000 if quick else 100_000
    nr = n // 10                  # TLS calls per round
    reps = 5 if quick else 9
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

    def write():
        cli.write(data)
        c_out.read()              # drop the ciphertext: the write alone is measured

    def reads():
        return _read_loop(r_srv, r_in, _records(r_cli, r_out, data, nr))

    base = {k: _per_call(f, n, reps) for k, f in plain.items()}
    base["tls_write_16k"] = _per_call(write, nr, reps)
    base["tls_read_16k"] = statistics.median(_per_call(reads(), nr, 1) for _ in range(reps))

    probe = _load(log)
    from stallscope.tracer.families.http import TlsAttacher
    tls = TlsAttacher(probe.bpf, log)
    other = subprocess.Popen([sys.executable, "-c", "import ssl, time; time.sleep(600)"])

    def ab(make, pids) -> float:
        """Median over rounds of (ns per call with uprobes on ``pids``) - (without): the
        two halves of a round run back to back, so load drift on the machine cancels."""
        diffs = []
        for _ in range(reps):
            tls.tick([])
            b0 = _per_call(make(), nr, 1)
            tls.tick(pids)
            if tls.pids() != sorted(pids):
                raise SystemExit(f"TLS uprobes not attached to {pids}: {tls.pids()}")
            diffs.append(_per_call(make(), nr, 1) - b0)
        return statistics.median(diffs)

    try:
        time.sleep(0.5)
        probed = {k: _per_call(f, n, reps) for k, f in plain.items()}
        me, them = [os.getpid()], [other.pid]
        added = {"tls_write_16k": ab(lambda: write, me), "tls_read_16k": ab(reads, me),
                 "tls_write_16k_non_owner": ab(lambda: write, them),
                 "tls_read_16k_non_owner": ab(reads, them)}
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
        for _ in range(3):
            tls.tick(me)
            cpu["probed"].append(upload())
            tls.tick([])
            cpu["base"].append(upload())
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
        out.append({"bench": "http", "figure": f"{k}_added_ns", "value": round(v, 1),
                    "base_ns": round(base[k.replace("_non_owner", "")], 1)})
    scale = (1 << 30) / total
    out.append({"bench": "http", "figure": "tls_upload_1GB_added_cpu_s",
                "value": round((statistics.median(cpu["probed"]) - statistics.median(cpu["base"])) * scale, 3),
                "base_cpu_s": round(statistics.median(cpu["base"]) * scale, 3), "measured_bytes": total})
    for line in out:
        print(json.dumps(line), flush=True)
    return out


if __name__ == "__main__":
    main("--quick" in sys.argv)

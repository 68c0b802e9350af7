"""A training-like workload on a simulated GPU, for the demo and the scenario tests.

The trainer process holds a context on GPU ``--gpu`` of the NVML simulator and
loops: ask its dataloader worker (a child process, like PyTorch's) for the next
shard, run "compute" (the GPU is busy for --compute-ms), and every
--ckpt-every steps write and fsync a checkpoint; with --peer it also exchanges
a gradient-sized message with a peer over TCP each step (an all-reduce stand-in).
While it waits for data, a checkpoint or the network, the GPU idles: exactly
the stalls stallscope must blame. What it did is written as JSON lines to
--log (ground truth for tests).

    python -m stallscope.sim.trainer --state /run/sim.state --gpu 0 --data /mnt/slow \\
        --steps 12 --slow-every 4 --ckpt /mnt/slow/slow-ckpt.pt --ckpt-every 6
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import socket
import time

SHARD_BYTES = 64 << 10


def _set_comm(name: str):
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)      # PR_SET_NAME
    except OSError:
        pass


def shard_name(i: int, slow: bool) -> str:
    return f"{'slow-' if slow else ''}shard-{i:04d}.bin"


def _worker(conn, data_dir: str, log_path: str):
    """The dataloader worker: reads the requested shard with one pread."""
    _set_comm("pt_data_worker")
    buf = bytearray(SHARD_BYTES)
    with open(log_path, "a") as log:
        while True:
            name = conn.recv()
            if name is None:
                return
            path = os.path.join(data_dir, name)
            t0 = time.time_ns()
            with open(path, "rb", buffering=0) as f:
                n = f.readinto(buf)
            t1 = time.time_ns()
            log.write(json.dumps({"kind": "read", "pid": os.getpid(), "path": path, "bytes": n,
                                  "start_ns": t0, "end_ns": t1}) + "\n")
            log.flush()
            conn.send(n)


def _checkpoint(path: str, log):
    t0 = time.time_ns()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\x5a" * SHARD_BYTES)
        t1 = time.time_ns()
        os.fsync(fd)
        t2 = time.time_ns()
    finally:
        os.close(fd)
    log.write(json.dumps({"kind": "checkpoint", "pid": os.getpid(), "path": path, "start_ns": t0,
                          "write_end_ns": t1, "fsync_start_ns": t1, "end_ns": t2}) + "\n")


def _allreduce(sock, nbytes: int, log):
    t0 = time.time_ns()
    sock.sendall(b"g" * nbytes)
    got = 0
    while got < nbytes:
        chunk = sock.recv(min(65536, nbytes - got))
        if not chunk:
            raise ConnectionError("peer closed")
        got += len(chunk)
    log.write(json.dumps({"kind": "allreduce", "pid": os.getpid(), "sport": sock.getsockname()[1],
                          "start_ns": t0, "end_ns": time.time_ns()}) + "\n")


def peer_main(argv=None):
    """An echo peer for --peer: accepts one connection and echoes until it closes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args(argv)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", a.port))
    srv.listen(1)
    srv.settimeout(a.timeout)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    c, _ = srv.accept()
    c.settimeout(a.timeout)
    while True:
        d = c.recv(65536)
        if not d:
            return
        c.sendall(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", required=True, help="NVML simulator state file")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--data", required=True, help="directory with the shards (created if missing)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compute-ms", type=float, default=300)
    ap.add_argument("--slow-every", type=int, default=0, help="every Nth shard is a slow one (0: none)")
    ap.add_argument("--ckpt", default=None, help="checkpoint file")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--peer", type=int, default=0, help="TCP port of an echo peer on 127.0.0.1")
    ap.add_argument("--peer-bytes", type=int, default=256 << 10)
    ap.add_argument("--idle-ms", type=float, default=0, help="sleep this long (GPU idle, no IO) mid-run")
    ap.add_argument("--log", required=True, help="JSON-lines ground truth")
    ap.add_argument("--name", default="trainer")
    a = ap.parse_args(argv)

    from stallscope.sim import nvmlsim
    _set_comm(a.name)
    gpu = nvmlsim.SimGpu(a.gpu, a.state)
    gpu.register()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    w = ctx.Process(target=_worker, args=(child, a.data, a.log), daemon=True)
    w.start()
    sock = None
    if a.peer:
        sock = socket.create_connection(("127.0.0.1", a.peer), timeout=60)
    with open(a.log, "a") as log:
        log.write(json.dumps({"kind": "start", "pid": os.getpid(), "worker_pid": w.pid, "gpu": a.gpu,
                              "t_ns": time.time_ns()}) + "\n")
        log.flush()
        with gpu.busy():
            time.sleep(a.compute_ms / 1000)
        for step in range(a.steps):
            slow = bool(a.slow_every) and step % a.slow_every == a.slow_every - 1
            parent.send(shard_name(step, slow))
            parent.recv()
            if sock is not None:
                _allreduce(sock, a.peer_bytes, log)
            if a.idle_ms and step == a.steps // 2:
                t0 = time.time_ns()
                time.sleep(a.idle_ms / 1000)
                log.write(json.dumps({"kind": "idle", "start_ns": t0, "end_ns": time.time_ns()}) + "\n")
            with gpu.busy():
                time.sleep(a.compute_ms / 1000)
            if a.ckpt and a.ckpt_every and step % a.ckpt_every == a.ckpt_every - 1:
                _checkpoint(a.ckpt, log)
                with gpu.busy():
                    time.sleep(a.compute_ms / 1000)
            log.flush()
        log.write(json.dumps({"kind": "end", "t_ns": time.time_ns()}) + "\n")
    parent.send(None)
    w.join(10)
    if sock is not None:
        sock.close()


def make_shards(data_dir: str, steps: int, slow_every: int):
    """Create the shard files a run of ``steps`` will read (in a backing dir, no stalls)."""
    os.makedirs(data_dir, exist_ok=True)
    for i in range(steps):
        slow = bool(slow_every) and i % slow_every == slow_every - 1
        p = os.path.join(data_dir, shard_name(i, slow))
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(os.urandom(SHARD_BYTES))


if __name__ == "__main__":
    main()

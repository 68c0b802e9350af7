"""Idle windows with known causes on the simulated GPU: the accuracy benchmark's workload.

A *plan* is a list of windows; each window is a busy phase (the GPU computes) followed by an
idle phase of a chosen length caused by one thing, as a training process meets it:

  worker_read   a dataloader worker forked for the window reads a stalled shard and exits
                (PyTorch re-forks its workers every epoch)
  thread_read   a thread of the training process reads a stalled shard
  write_fsync   a checkpoint written then fsynced, both stalled (a chain)
  upload        a checkpoint written at full speed to a mount that uploads it on close()
                (FUSE FLUSH, as gcsfuse or s3fs do; NFS writes back on close the same way)
  storm         many small reads of one shard, each below the tracer's threshold
  small_files   a short-lived dataloader worker opens and reads many small files of one
                folder (an image-folder dataset), each read below the threshold
  cold_opens    the same worker on a filesystem whose metadata is slow (cold NFS lookups):
                each open stalls below the threshold, the reads come at once
  pool_files    the training process's thread pool (POOL_THREADS threads) reads such a
                folder's files in parallel while the main thread waits on the futures (a
                dataset's __getitem__ fetching a sample's many parts at once)
  mmap          page faults on a memory-mapped, stalled dataset file
  copy          a checkpoint copied with shutil.copyfile (copy_file_range / sendfile)
  metadata      stat() of a file on a filesystem whose metadata is slow
  cpu           the data thread is runnable but a CPU hog holds its CPU
  compute       the training process itself computes on the CPU (Python-side preprocessing,
                metrics): nothing is blocked; "unexplained", classed cpu_bound with its pid
  worker_compute  a persistent dataloader worker (forked once, at the start) decodes on the
                CPU while the training process waits for it on a pipe: cpu_bound, the worker
  stream        a persistent dataloader worker fetches the next sample over HTTP from a slow
                dataset server (a separate process on loopback, as an object store or a
                streaming dataset's server is) while the training process waits for it on a
                pipe: nothing blocked; "unexplained", classed net_wait naming the worker
  thread_stream the training process fetches the next shard from that server in a thread
                pool (boto3's transfers, a streaming dataset's downloaders) and waits on the
                future: net_wait naming the training process (its helper thread waited)
  pipe_stream   the persistent worker reads each shard from a ``curl`` it starts, through a
                pipe (WebDataset's ``pipe:curl -s URL`` shards; ``aws s3 cp URL -`` alike):
                net_wait naming curl (a poll of its socket and libcurl's wakeup socketpair)
  async_stream  the persistent worker fetches each sample with asyncio streams (an aiohttp
                style loop: an epoll of the loop's self-pipe and the connection): net_wait
                naming the worker
  loop_stream   the same through an asyncio loop in a thread of the worker, waiting on the
                future (fsspec: s3fs, gcsfs, HF datasets' streaming), two requests at once to
                two addresses of the server's port (S3's endpoint answers each connection
                with another address): net_wait naming the worker
  nothing       the process just waits (no IO): the verdict must be "unexplained", unclassed

With ``distractor`` set, an unrelated process (not a descendant of the trainer) does the same
kind of stall on its own file at the same time: it must never be blamed.

The trainer (:func:`trainer_main`) writes ground truth as JSON lines: per window its
cause, the idle phase's wall-clock start and end, the pids that may be blamed and the file,
and the distractor's pid and file. The files and their stalls are prepared by the caller
(``bench/bench_accuracy.py``, ``tests/bpf/test_accuracy.py``) with :func:`prepare`.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import sys
import threading
import time

CAUSES = ("worker_read", "thread_read", "write_fsync", "upload", "storm", "small_files", "cold_opens", "pool_files",
          "mmap", "copy",
          "metadata", "cpu", "compute", "worker_compute", "stream", "thread_stream", "pipe_stream",
          "async_stream", "loop_stream", "nothing")
#: causes where a process of the GPU waits on the slow dataset server (the last of a
#: window's ``pids`` is the one that waited on the socket)
NET_CAUSES = ("stream", "thread_stream", "pipe_stream", "async_stream", "loop_stream")
#: causes with nothing to trace: the verdict is "unexplained", with this class
UNTRACED = {"compute": "cpu_bound", "worker_compute": "cpu_bound", **{c: "net_wait" for c in NET_CAUSES},
            "nothing": None}
#: causes whose window names a folder of small files rather than one file
FOLDER_CAUSES = ("small_files", "cold_opens", "pool_files")
#: threads of the pool_files cause's pool
POOL_THREADS = 4
STORM_OP_MS = 7.0          # each storm read stalls this long (under the 10 ms default threshold)
MMAP_PAGES = 8             # pages touched per mmap window, 1 MiB apart (one fault each)
BUSY_S = (0.5, 0.9)        # busy phase before each idle window
CPU_SHARE = 0.25           # what a nice-0 thread gets beside a nice -5 hog (weights 1024:3121)


def make_plan(n: int, seed: int = 1, causes=CAUSES, min_ms: int = 300, max_ms: int = 3000,
              distractor_share: float = 0.5) -> list:
    """``n`` windows with random causes, lengths and distractors (reproducible by seed)."""
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        cause = causes[i % len(causes)] if i < len(causes) else rng.choice(causes)
        plan.append({"idx": i, "cause": cause, "dur_ms": rng.randint(min_ms, max_ms),
                     "busy_s": round(rng.uniform(*BUSY_S), 3),
                     "distractor": cause not in ("cpu", *UNTRACED) and rng.random() < distractor_share})
    return plan


def file_name(w: dict, other: bool = False) -> str:
    """A window's file (for small_files and cold_opens: its folder)."""
    return f"w{w['idx']:03d}-{w['cause']}{'-other' if other else ''}" + ("" if w["cause"] in FOLDER_CAUSES else ".bin")


def small_files(n: int) -> list:
    """The names of a small_files window's ``n`` files inside its folder."""
    return [f"img{k:05d}.jpg" for k in range(n)]


def prepare(fs, plan: list) -> None:
    """Create every window's files on a SlowFS and give each its own stall."""
    for w in plan:
        d = w["dur_ms"]
        for other in (False, True):
            if other and not w["distractor"]:
                continue
            name = file_name(w, other)
            c = w["cause"]
            if c in ("worker_read", "thread_read", "copy", "metadata"):
                fs.make_file(name, 64 << 10)
                fs.set_delay(d, path=name)
            elif c == "write_fsync":
                fs.make_file(name, 0)
                fs.set_delay(d / 2, path=name)
            elif c == "upload":
                fs.make_file(name, 0)
                fs.set_delay(d, path=name, op="flush")
            elif c == "storm":
                n = max(2, int(d / (STORM_OP_MS + 0.5)))
                fs.make_file(name, n * 4096)
                fs.set_delay(STORM_OP_MS, path=name)
            elif c in FOLDER_CAUSES:      # every op of each file stalls, or its open only
                per = POOL_THREADS if c == "pool_files" else 1
                for f in small_files(max(2, int(per * d / (STORM_OP_MS + 0.5)))):
                    fs.make_file(f"{name}/{f}", 4096)
                    fs.set_delay(STORM_OP_MS, path=f"{name}/{f}", op="open" if c == "cold_opens" else None)
            elif c == "mmap":
                fs.make_file(name, MMAP_PAGES << 20)
                fs.set_delay(d / MMAP_PAGES, path=name)


# ----------------------------------------------------------------------------- the stalls

def _read(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        f.read(64 << 10)


def _write_fsync(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\x5a" * (64 << 10))
        os.fsync(fd)
    finally:
        os.close(fd)


def _storm(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for off in range(0, size, 4096):
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)


def _write_close(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"\x5a" * (64 << 10))


def _read_small(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        f.read(4096)


def _small_files(folder: str) -> None:
    for name in sorted(os.listdir(folder)):
        _read_small(os.path.join(folder, name))


def _pool_files(folder: str) -> None:
    import concurrent.futures
    names = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
    with concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="sample-parts") as ex:
        list(ex.map(_read_small, names))


def _mmap(path: str) -> None:
    with open(path, "rb") as f:
        # MAP_PRIVATE: FUSE refuses shared maps of its direct_io (stalled) files
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        try:
            total = 0
            for p in range(MMAP_PAGES):
                total += m[p << 20]
        finally:
            m.close()


def _copy(path: str, scratch: str) -> None:
    shutil.copyfile(path, os.path.join(scratch, os.path.basename(path) + ".copy"))


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def stall(cause: str, path: str, dur_ms: float, scratch: str) -> None:
    """Do one window's stall in the calling thread (the distractor uses this too)."""
    if cause in ("worker_read", "thread_read"):
        _read(path)
    elif cause == "metadata":
        os.stat(path)
    elif cause == "write_fsync":
        _write_fsync(path)
    elif cause == "upload":
        _write_close(path)
    elif cause == "storm":
        _storm(path)
    elif cause == "pool_files":
        _pool_files(path)
    elif cause in FOLDER_CAUSES:
        _small_files(path)
    elif cause == "mmap":
        _mmap(path)
    elif cause == "copy":
        _copy(path, scratch)
    elif cause == "nothing":
        time.sleep(dur_ms / 1000)


# ----------------------------------------------------------------------------- processes

def _set_comm(name: str) -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(15, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


def distractor_main(argv=None) -> None:
    """An unrelated process: does each stall named on its stdin (``cause path dur_ms``), says
    ``done`` after each. Started by the caller, not by the trainer, so it is no descendant."""
    _set_comm("backup-agent")
    scratch = argv[0] if argv else "/tmp"
    print(json.dumps({"pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cause, path, dur = line.split()
        try:
            stall(cause, path, float(dur), scratch)
        except OSError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            continue
        print("done", flush=True)


def hog_main(argv=None) -> None:
    """A CPU hog pinned to one CPU at high priority: spins while its file says so."""
    _set_comm("cpu-hog")
    cpu, flag = int(argv[0]), argv[1]
    os.sched_setaffinity(0, {cpu})
    try:
        os.nice(-5)
    except OSError:
        pass
    print(json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        if os.path.exists(flag):
            _spin(0.05)
        else:
            time.sleep(0.005)


def trainer_main(argv=None) -> None:
    """Run a plan on the simulated GPU: ``state gpu plan.json fs_root scratch log [distractor
    stdin/stdout fds] [hog flag file]`` (see bench/bench_accuracy.py for the wiring)."""
    import argparse

    from stallscope.sim import nvmlsim
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--fs", required=True, help="SlowFS mountpoint")
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--distractor-in", type=int, default=-1, help="fd: write commands")
    ap.add_argument("--distractor-out", type=int, default=-1, help="fd: read 'done'")
    ap.add_argument("--distractor-pid", type=int, default=0)
    ap.add_argument("--hog-flag", default="", help="file whose presence makes the hog spin")
    ap.add_argument("--hog-pid", type=int, default=0)
    ap.add_argument("--hog-cpu", type=int, default=0)
    a = ap.parse_args(argv)
    _set_comm("trainer")
    plan = json.load(open(a.plan))
    gpu = nvmlsim.SimGpu(a.gpu, a.state)
    gpu.register()
    din = os.fdopen(a.distractor_in, "w") if a.distractor_in >= 0 else None
    dout = os.fdopen(a.distractor_out, "r") if a.distractor_out >= 0 else None
    me = os.getpid()
    worker = _Worker(_spin) if any(w["cause"] == "worker_compute" for w in plan) else None
    server = DatasetServer() if any(w["cause"] in NET_CAUSES for w in plan) else None
    pool = None
    if any(w["cause"] == "thread_stream" for w in plan):
        import concurrent.futures
        pool = concurrent.futures.ThreadPoolExecutor(2, initializer=_set_comm, initargs=("shard-fetch",))
    used = {w["cause"] for w in plan}
    fetcher = _Worker(server.fetch) if server is not None and "stream" in used else None
    piper = _Worker(server.fetch_curl) if server is not None and "pipe_stream" in used else None
    looper = _Worker(server.fetch_async) if server is not None and "async_stream" in used else None
    threader = _Worker(server.fetch_loop) if server is not None and "loop_stream" in used else None
    with open(a.log, "a") as log:
        log.write(json.dumps({"kind": "start", "pid": me}) + "\n")
        for w in plan:
            t_busy = time.monotonic() + w["busy_s"]
            with gpu.busy():
                _spin(max(0.0, t_busy - time.monotonic()))
            cause, d = w["cause"], w["dur_ms"]
            path = os.path.join(a.fs, file_name(w))
            other = os.path.join(a.fs, file_name(w, True)) if w["distractor"] else ""
            if other and din is not None:
                din.write(f"{cause} {other} {d}\n")
                din.flush()
            start = time.time_ns()
            pids = [me]
            if cause in ("worker_read", "small_files", "cold_opens"):
                pid = os.fork()
                if pid == 0:                       # the short-lived worker
                    try:
                        _set_comm("pt_data_worker")
                        stall(cause, path, d, a.scratch)
                    finally:
                        os._exit(0)
                pids.append(pid)
                os.waitpid(pid, 0)
            elif cause == "thread_read":
                t = threading.Thread(target=_read, args=(path,), name="pt_pin_memory")
                t.start()
                t.join()
            elif cause == "cpu":
                # the data thread, pinned where the hog spins, must do dur_ms of CPU work
                open(a.hog_flag, "w").close()
                def work():
                    os.sched_setaffinity(0, {a.hog_cpu})
                    _spin_cpu(d / 1000 * CPU_SHARE)
                t = threading.Thread(target=work, name="pt_data_thread")
                t.start()
                t.join()
                os.unlink(a.hog_flag)
            elif cause == "compute":
                _spin(d / 1000)
            elif cause == "worker_compute":
                assert worker is not None      # forked at the start for such a plan
                worker.compute(d / 1000)
                pids.append(worker.pid)
            elif cause == "stream":
                assert fetcher is not None
                fetcher.compute(d / 1000)
                pids.append(fetcher.pid)
            elif cause == "thread_stream":
                assert pool is not None and server is not None
                pool.submit(server.fetch, d / 1000).result()
            elif cause == "pipe_stream":
                assert piper is not None
                pids += [piper.pid, piper.compute(d / 1000)]      # the worker, then its curl
            elif cause in ("async_stream", "loop_stream"):
                wk = looper if cause == "async_stream" else threader
                assert wk is not None
                wk.compute(d / 1000)
                pids.append(wk.pid)
            else:
                stall(cause, path, d, a.scratch)
            end = time.time_ns()
            rec = {"kind": "window", "idx": w["idx"], "cause": cause, "start_ns": start, "end_ns": end,
                   "dur_ms": d, "pids": pids, "path": "" if cause in ("cpu", *UNTRACED) else path,
                   "other_pid": a.distractor_pid if other else 0, "other_path": other,
                   "hog_pid": a.hog_pid if cause == "cpu" else 0}
            if other and dout is not None:
                rec["other_done"] = dout.readline().strip() == "done"
            log.write(json.dumps(rec) + "\n")
            log.flush()
        with gpu.busy():
            _spin(0.8)
    for wk in (worker, fetcher, piper, looper, threader):
        if wk is not None:
            wk.close()
    if pool is not None:
        pool.shutdown()
    if server is not None:
        server.close()
    gpu.unregister()


#: the trainer's ends of its workers' pipes: a process forked later (another worker, the
#: dataset server) closes its copies, or a worker would never see its request pipe close
_PARENT_FDS: set = set()


def _close_inherited() -> None:
    for fd in _PARENT_FDS:
        try:
            os.close(fd)
        except OSError:
            pass


class _Worker:
    """A persistent dataloader worker (forked once, as with persistent_workers=True): on each
    request it runs ``task`` (computes, fetches) for the seconds asked, then answers with
    what the task returned (an int: the pid of a process it ran, or None); the trainer waits
    on the pipe."""

    def __init__(self, task):
        req_r, self._req = os.pipe()
        self._done, done_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                _set_comm("pt_data_worker")
                _close_inherited()
                os.close(self._req)
                os.close(self._done)
                with os.fdopen(req_r, "r") as req, os.fdopen(done_w, "w") as done:
                    for line in req:
                        got = task(float(line))
                        done.write(f"done {got or 0}\n")
                        done.flush()
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(done_w)
        _PARENT_FDS.update((self._req, self._done))

    def compute(self, seconds: float) -> int:
        """Run the task for ``seconds``; what it returned (0 for None)."""
        os.write(self._req, f"{seconds}\n".encode())
        got = os.read(self._done, 64).split()       # one short line, written at once
        if len(got) != 2 or got[0] != b"done":
            raise RuntimeError("the worker did not answer")
        return int(got[1])

    def close(self) -> None:
        _PARENT_FDS.difference_update((self._req, self._done))
        os.close(self._req)
        os.close(self._done)
        os.waitpid(self.pid, 0)


#: the asyncio loop thread of a worker that fetches as fsspec does (started on first use)
_LOOP = None


class DatasetServer:
    """A slow HTTP dataset server on loopback, in a process of its own (forked twice, so it is
    no descendant of the trainer, as a remote server is not): ``GET /sample?ms=N`` answers a
    64 KiB sample after N ms, at 127.0.0.1 and 127.0.0.2 on one port (one service behind
    two addresses, as DNS answers an object store's endpoint). :meth:`fetch` is the client
    side, as a streaming dataset's worker does it (http.client with a timeout: Python waits
    in poll() on the socket)."""

    def __init__(self):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                _close_inherited()
                if os.fork() == 0:
                    _set_comm("dataset_server")
                    self._serve(w)
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            self.pid, self.port = (int(x) for x in f.readline().split())

    @staticmethod
    def _serve(w: int) -> None:
        import http.server
        import urllib.parse

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                time.sleep(float(q.get("ms", ["0"])[0]) / 1000)
                body = b"\xa5" * 65536
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        second = http.server.ThreadingHTTPServer(("127.0.0.2", srv.server_address[1]), Handler)
        threading.Thread(target=second.serve_forever, daemon=True).start()
        os.write(w, f"{os.getpid()} {srv.server_address[1]}\n".encode())
        os.close(w)
        srv.serve_forever()

    def fetch(self, seconds: float) -> None:
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request("GET", f"/sample?ms={seconds * 1000:.0f}")
            r = c.getresponse()
            if r.status != 200 or len(r.read()) != 65536:
                raise RuntimeError(f"dataset server answered {r.status}")
        finally:
            c.close()

    def fetch_curl(self, seconds: float) -> int:
        """The sample through a pipe from a ``curl`` started for it (WebDataset's ``pipe:``
        URLs): read to the end, as a tar shard is; the pid of that curl."""
        import subprocess
        p = subprocess.Popen(["curl", "-sf", "--max-time", "60",
                              f"http://127.0.0.1:{self.port}/sample?ms={seconds * 1000:.0f}"],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert p.stdout is not None
        n = len(p.stdout.read())
        if p.wait() != 0 or n != 65536:
            raise RuntimeError(f"curl exited {p.returncode} after {n} bytes")
        return p.pid

    async def _get(self, seconds: float, host: str = "127.0.0.1") -> None:
        """The sample with asyncio streams (an aiohttp-style client)."""
        import asyncio
        r, w = await asyncio.open_connection(host, self.port)
        w.write(f"GET /sample?ms={seconds * 1000:.0f} HTTP/1.0\r\n\r\n".encode())
        await w.drain()
        n = len((await r.read()).partition(b"\r\n\r\n")[2])
        w.close()
        if n != 65536:
            raise RuntimeError(f"dataset server sent {n} bytes")

    def fetch_async(self, seconds: float) -> None:
        """The sample in an asyncio loop of this thread (it waits in epoll on the loop's
        self-pipe and the connection)."""
        import asyncio
        asyncio.run(self._get(seconds))

    def fetch_loop(self, seconds: float) -> None:
        """The sample through an asyncio loop running in a thread of its own, waiting on the
        future, as fsspec does (s3fs, gcsfs, HF datasets' streaming): the loop's thread
        waits in epoll, this one on a futex. Two requests at once, one to each address of
        the server (s3fs's concurrent range requests, which DNS sends to different
        addresses of the endpoint)."""
        import asyncio
        global _LOOP
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="fsspecIO", daemon=True).start()

        async def both():
            await asyncio.gather(self._get(seconds), self._get(seconds, "127.0.0.2"))
        asyncio.run_coroutine_threadsafe(both(), _LOOP).result()

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _spin_cpu(cpu_seconds: float) -> None:
    """Burn this much CPU time (thread CPU clock), however long the wall clock takes."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    trainer_main(sys.argv[1:])

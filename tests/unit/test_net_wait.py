"""GPU idle while its processes waited on a TCP peer (analysis/verdict.py net_wait, from the
tracer's "wait" table: tracer/cpu.py): a DataLoader worker streaming samples over HTTP or from
an object store, a trainer on a rendezvous store. A socket wait is voluntary, so no stall probe
reports it; the CPU sampler finds the process asleep in a receive on a TCP socket."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

from stallscope.analysis.analyze import LiveAnalyzer, analyze
from stallscope.analysis.text import format_text, verdict_line
from stallscope.analysis.verdict import net_wait
from stallscope.export.prometheus import verdict_labels
from stallscope.tracer.cpu import CpuSampler, TcpPeers, _peer, read_wait
from tests.unit.test_blame import MS, T0, table
from tests.unit.test_cpu_bound import TRAINER, WORKER, WORKER2, S, _cpu_rows, _world

PEER = "10.0.0.5:443"


def _waits(pid, ks, period=500 * MS, peer=PEER, call="poll"):
    """``pid`` found waiting at the samples ``ks`` (sample k at T0 + k * period)."""
    return [{"ts_ns": T0 + k * period, "pid": pid, "call": call, "peer": peer} for k in ks]


def _net_world(waits):
    b = _world()[0]                 # GPU idle 3-5 s; everyone mostly asleep; samples every 500 ms
    b.tables["wait"] = table("wait", waits)
    return [b]


def test_a_worker_waiting_on_a_tcp_peer_is_named():
    # samples 6-10 fall in the idle 3-5 s: the worker waited at all of them, the other not
    vs = analyze(_net_world(_waits(WORKER, range(6, 11)) + _waits(WORKER2, [8], peer="10.0.0.9:80"))).verdicts
    assert [v.verdict for v in vs] == ["unexplained"]
    v = vs[0]
    assert v.klass == "net_wait"
    p = v.process
    assert (p["pid"], p["comm"], p["peer"], p["call"], p["count"]) == (WORKER, "pt_data_worker", PEER, "poll", 1)
    assert p["share"] >= 0.99 and p["samples"] == 5
    line = verdict_line(v)
    assert f"on the network: pt_data_worker pid {WORKER} was waiting to receive from {PEER} (poll)" in line, line
    assert json.loads(json.dumps(v.to_json()))["class"] == "net_wait"
    assert "net_wait" in verdict_labels(v)
    assert "1 while a GPU process or its workers waited on a TCP peer" in format_text(analyze(
        _net_world(_waits(WORKER, range(6, 11)))))
    live = LiveAnalyzer()
    got = live.add(_net_world(_waits(WORKER, range(6, 11)))) + live.flush()
    assert [v.klass for v in got] == ["net_wait"]


def test_waits_outside_the_interval_or_of_another_process_or_too_few_leave_it_plain():
    assert analyze(_net_world(_waits(WORKER, range(0, 6)) + _waits(WORKER, range(11, 20)))).verdicts[0].klass is None
    assert analyze(_net_world(_waits(4000, range(6, 11)))).verdicts[0].klass is None       # not the GPU's
    assert analyze(_net_world(_waits(WORKER, [6, 8]))).verdicts[0].klass is None           # 2 of 5 samples
    assert analyze(_net_world([])).verdicts[0].klass is None


def test_a_computing_process_comes_first():
    b = _world(workers=[1.0] * 20)[0]
    b.tables["wait"] = table("wait", _waits(TRAINER, range(6, 11)))
    assert analyze([b]).verdicts[0].klass == "cpu_bound"


def test_net_wait_rule_edges():
    cpu = table("cpu", _cpu_rows(7, [0.0] * 6))                      # samples at 0-3 s
    w = table("wait", _waits(7, [1, 2, 3], peer="a:1") + _waits(7, [4], peer="b:2"))
    got = net_wait(w, cpu, [7], T0 + 400 * MS, T0 + 2600 * MS)     # samples 1-5: waiting at 1-4
    assert got[0] == "net_wait" and got[1]["peer"] == "a:1" and got[1]["samples"] == 4
    assert net_wait(w, cpu, [8], T0 + 400 * MS, T0 + 2600 * MS) is None
    assert net_wait(w, cpu, [7], T0 + 900 * MS, T0 + 1100 * MS) is None        # one sample inside
    assert net_wait(None, cpu, [7], T0, T0 + 3000 * MS) is None


def test_peer_addresses_as_proc_net_tcp_writes_them():
    assert _peer("0100007F:1F90") == "127.0.0.1:8080"
    assert _peer("00000000000000000000000001000000:01BB") == "[::1]:443"
    assert _peer("0000000000000000FFFF00000500000A:0050") == "10.0.0.5:80"     # v4-mapped


WAITER = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
if sys.argv[2] == "timeout":
    c.settimeout(60)          # Python waits in poll() on the one socket, then recv()
print("connected", flush=True)
c.recv(10)
"""


@contextlib.contextmanager
def _clients(script: str, modes):
    """A TCP server on loopback and one ``script`` process per mode (``argv``: port, mode, the
    read end of a pipe), each connected to it; yields (port, {mode: Popen}, pipe read fd).
    Processes added to the dict are killed too."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    r, w = os.pipe()
    procs: dict = {}
    conns = []
    try:
        for mode in modes:
            procs[mode] = subprocess.Popen([sys.executable, "-c", script, str(port), mode, str(r)],
                                           stdout=subprocess.PIPE, text=True, pass_fds=(r,))
            conns.append(srv.accept()[0])
            assert procs[mode].stdout.readline().strip() == "connected"
        yield port, procs, r
    finally:
        for c in conns:
            c.close()
        os.write(w, b"x")
        for p in procs.values():
            p.kill()
            p.wait()
        srv.close()


def test_the_sampler_finds_processes_waiting_on_a_tcp_peer():
    """Real processes on loopback: one in a blocking recv, one in a receive with a timeout
    (poll on its socket), one reading a pipe; only the first two are waits, each with the
    server's address."""
    with _clients(WAITER, ("block", "timeout")) as (port, procs, r):
        procs["pipe"] = subprocess.Popen([sys.executable, "-c", "import os,sys; os.read(int(sys.argv[1]), 1)", str(r)],
                                         pass_fds=(r,))
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = {m: read_wait(p.pid) for m, p in procs.items()}
            if got["block"] and got["timeout"]:
                break
            time.sleep(0.05)
        assert got["block"] == ("recvfrom", f"127.0.0.1:{port}"), got
        assert got["timeout"] == ("poll", f"127.0.0.1:{port}"), got
        assert got["pipe"] is None
        assert read_wait(os.getpid()) is None                       # running
        assert read_wait(2 ** 22 + 1) is None                        # gone
        table_ = CpuSampler().poll([p.pid for p in procs.values()])
        assert sorted(table_["wait"]["pid"].tolist()) == sorted([procs["block"].pid, procs["timeout"].pid])
        assert set(table_["wait"]["peer"].tolist()) == {f"127.0.0.1:{port}"}
        peers = TcpPeers(refresh_s=60)
        read_wait(procs["block"].pid, peers=peers)
        read_wait(procs["timeout"].pid, peers=peers)
        assert peers.reads == 1                                      # one netns, read once


FAMILY = """
import os, socket, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
pid = os.fork()
if pid == 0:                       # the child: waits on its parent (a tracking service's shape)
    c = socket.create_connection(srv.getsockname())
    c.recv(10)
    os._exit(0)
conn, _ = srv.accept()
print(pid, flush=True)
time.sleep(30)
"""


def test_a_wait_on_another_process_of_the_same_gpu_is_not_a_network_wait():
    """A child waiting to receive from its own parent over loopback TCP (a logging or
    tracking service the trainer started): not a wait on the network; the same child seen
    alone (its parent not a member) is."""
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        import time
        deadline = time.monotonic() + 10
        while read_wait(child) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_wait(child) is not None                 # it is in a TCP receive
        got = CpuSampler(children_s=0).poll([parent.pid])
        assert sorted(got["cpu"]["pid"].tolist()) == sorted([parent.pid, child])
        assert "wait" not in got, got["wait"]
        alone = CpuSampler(children_s=0).poll([child])
        assert alone["wait"]["pid"].tolist() == [child]
    finally:
        parent.kill()
        parent.wait()


THREADED = """
import ctypes, concurrent.futures, os, socket, sys, threading, time
port, mode = int(sys.argv[1]), sys.argv[2]
def fetch():
    ctypes.CDLL("libc.so.6").prctl(15, b"shard-fetch", 0, 0, 0)     # the thread's comm
    c = socket.create_connection(("127.0.0.1", port))
    c.settimeout(60)
    print("connected", flush=True)
    return c.recv(10)
if mode == "future":               # the main thread waits on the future: a futex
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        ex.submit(fetch).result()
elif mode == "sleep":              # the main thread polls for the result in a sleep loop
    threading.Thread(target=fetch, daemon=True).start()
    while True:
        time.sleep(0.05)
else:                              # the main thread reads a pipe: it waits on no thread
    threading.Thread(target=fetch, daemon=True).start()
    os.read(int(sys.argv[3]), 1)
"""


def test_a_helper_thread_waiting_on_a_tcp_peer_for_the_main_thread_is_found():
    """A thread pool fetching over the network while the main thread waits on it (a futex)
    or sleeps in a loop: the helper thread's receive is the process's wait, named with the
    thread. A helper thread in a receive while the main thread reads a pipe (it waits on
    something else: another process) is not; the thread last found is read again each pass,
    the others at most every ``thread_scan_s``."""
    with _clients(THREADED, ("future", "sleep", "pipe")) as (port, procs, _r):
        import time
        sampler = CpuSampler(thread_scan_s=0.0)
        pids = {p.pid: m for m, p in procs.items()}
        deadline = time.monotonic() + 10
        found: dict = {}
        while time.monotonic() < deadline and set(found) != {"future", "sleep"}:
            got = sampler.poll(list(pids))
            for pid, call, peer in zip(*(got.get("wait", {}).get(c, []) for c in ("pid", "call", "peer"))):
                found[pids[int(pid)]] = (call, peer)
            time.sleep(0.05)
        assert found == {m: ("poll in thread shard-fetch", f"127.0.0.1:{port}") for m in ("future", "sleep")}, found
        slow = CpuSampler(thread_scan_s=60.0)
        slow.poll([procs["future"].pid])
        first = slow.thread_reads
        assert first >= 1
        again = slow.poll([procs["future"].pid])
        assert again["wait"]["call"].tolist() == ["poll in thread shard-fetch"]
        assert slow.thread_reads == first + 1            # only the thread found last time


def test_a_scan_that_found_nothing_waits_until_a_gpu_computed_again():
    """The main thread waits on a future whose thread sleeps (no network): a scan of its
    threads finds nothing and the next poll does not scan again; once a GPU computed
    (``rearm``), the next idle spell's first poll does."""
    import sys
    code = ("import concurrent.futures, time\n"
            "with concurrent.futures.ThreadPoolExecutor(1) as ex:\n"
            "    ex.submit(time.sleep, 60).result()\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(os.listdir(f"/proc/{p.pid}/task")) < 2:
            time.sleep(0.02)
        time.sleep(0.2)
        sampler = CpuSampler(thread_scan_s=60.0)
        sampler.poll([p.pid])
        first = sampler.thread_reads
        assert first >= 1
        sampler.poll([p.pid])
        assert sampler.thread_reads == first            # backing off
        sampler.rearm()
        sampler.poll([p.pid])
        assert sampler.thread_reads == 2 * first        # scanned again
    finally:
        p.kill()
        p.wait()


def test_an_inode_the_tables_do_not_list_is_not_looked_for_again_at_once(tmp_path):
    """A process asleep on a UNIX socket: its inode is in no TCP table. One fresh read says
    so; the next passes do not parse the namespace's tables again for ``negative_s``, while
    an inode not yet looked for still does."""
    pid = 4242
    (tmp_path / str(pid) / "net").mkdir(parents=True)
    (tmp_path / str(pid) / "ns").mkdir()
    os.symlink("/proc/self/ns/net", tmp_path / str(pid) / "ns" / "net")
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = "   0: 0100007F:1F90 0500000A:01BB 01 00000000:00000000 00:00000000 00000000     0        0 777 1\n"
    (tmp_path / str(pid) / "net" / "tcp").write_text(head + row)
    (tmp_path / str(pid) / "net" / "tcp6").write_text(head)
    peers = TcpPeers(proc=str(tmp_path), refresh_s=0.0, negative_s=60.0)
    assert peers.one_peer(pid, (777,)) == (777, "10.0.0.5:443") and peers.reads == 1
    assert peers.one_peer(pid, (999,)) is None and peers.reads == 2        # a miss: read again once
    for _ in range(5):
        assert peers.one_peer(pid, (999,)) is None
    assert peers.reads == 2                                                # not again for negative_s
    assert peers.one_peer(pid, (998,)) is None and peers.reads == 3        # another inode: looked for


LOOPS = """
import asyncio, os, select, socket, sys, threading
port, mode = int(sys.argv[1]), sys.argv[2]
c = socket.create_connection(("127.0.0.1", port))
a, b = socket.socketpair()            # a wakeup channel, as libcurl and asyncio keep one
if mode == "curl":                    # libcurl's multi loop: its socket and the socketpair
    print("connected", flush=True)
    p = select.poll()
    p.register(c, select.POLLIN)
    p.register(a, select.POLLIN)
    p.poll()
elif mode == "asyncio":               # an asyncio client: epoll over its self-pipe and the socket
    async def main():
        r, _w = await asyncio.open_connection(sock=c)
        print("connected", flush=True)
        await r.read(10)
    asyncio.run(main())
elif mode in ("two", "pool"):         # a poll of two TCP connections: to two hosts, or one
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.listen()
    d = socket.create_connection(other.getsockname() if mode == "two" else ("127.0.0.1", port))
    print("connected", flush=True)
    p = select.poll()
    p.register(c, select.POLLIN)
    p.register(d, select.POLLIN)
    p.poll()
elif mode == "service":               # a poll of connections to one port of two hosts (one
    other = socket.socket()           # service behind two addresses, as S3's endpoint answers)
    other.bind(("127.0.0.2", port))
    other.listen()
    d = socket.create_connection(("127.0.0.2", port))
    print("connected", flush=True)
    p = select.poll()
    p.register(c, select.POLLIN)
    p.register(d, select.POLLIN)
    p.poll()
elif mode == "big_pool":              # an epoll over a pool of 12 connections to one server
    e = select.epoll()                # and a wakeup channel (aiobotocore's pool holds 10)
    pool = [c] + [socket.create_connection(("127.0.0.1", port)) for _ in range(11)]
    for s in pool + [a]:
        e.register(s, select.EPOLLIN)
    print("connected", flush=True)
    e.poll()
elif mode == "server":                # a server polling its listening socket and one client
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    print("connected", flush=True)
    p = select.poll()
    p.register(c, select.POLLIN)
    p.register(srv, select.POLLIN)
    p.poll()
else:                                 # an epoll loop in a helper thread (Gloo's, a TCPStore's)
    def loop():
        e = select.epoll()
        e.register(c, select.EPOLLIN)
        e.register(a, select.EPOLLIN)
        e.poll()
    threading.Thread(target=loop, daemon=True).start()
    print("connected", flush=True)
    ev = threading.Event()
    ev.wait()                         # the main thread waits on a futex
"""


def test_event_loops_waiting_on_one_tcp_peer_are_found():
    """Real processes: a poll of one TCP socket and a wakeup socketpair (libcurl's loop, as
    a ``pipe:curl`` shard reader's curl waits), an asyncio client's epoll (its self-pipe
    and the connection), and a poll of two connections to one server (a client's pool) are
    waits on the server, and so are a poll of connections to one port of two hosts (one
    service behind two addresses) and an epoll over a pool of 12 connections. A poll of
    connections to two hosts on two ports and a poll that holds a listening socket (a
    server) are not. An epoll in a helper thread while the main thread
    waits on a futex is not in a process a GPU lists (Gloo's loop, a TCPStore's: there
    whether or not anyone waits), and is in one that descends from it (a worker's fsspec
    loop thread, a Go tool's netpoller)."""
    import time
    modes = ("curl", "asyncio", "pool", "service", "big_pool", "helper_epoll", "two", "server")
    waiting = modes[:6]

    def seen(sampler, roots, names, want):
        deadline = time.monotonic() + 10
        found: dict = {}
        while time.monotonic() < deadline and set(found) != set(want):
            got = sampler.poll(roots) or {}
            for pid, call, peer in zip(*(got.get("wait", {}).get(c, []) for c in ("pid", "call", "peer"))):
                if int(pid) in names:
                    found[names[int(pid)]] = (call, peer)
            time.sleep(0.05)
        return found

    with _clients(LOOPS, waiting) as (port, procs, _r), _clients(LOOPS, modes[6:]) as (_p2, others, _r2):
        names = {p.pid: m for m, p in {**procs, **others}.items()}
        time.sleep(0.3)                                  # every process had time to reach its wait
        server = f"127.0.0.1:{port}"
        as_roots = seen(CpuSampler(thread_scan_s=0.0), list(names), names, waiting[:5])
        assert as_roots == {"curl": ("poll", server), "asyncio": ("epoll_wait", server),
                            "pool": ("poll", server), "service": ("poll", f"{server} (+1 more host)"),
                            "big_pool": ("epoll_wait", server)}, as_roots
        helper = procs["helper_epoll"].pid
        sampler = CpuSampler(thread_scan_s=0.0)
        assert sampler._wait(helper, {helper}, threads=2, root=True) is None
        assert sampler._wait(helper, {helper}, threads=2, root=False) == ("epoll_wait in thread python", server)
        assert read_wait(procs["asyncio"].pid) == ("epoll_wait", server)
        for m in ("two", "server"):
            assert read_wait(others[m].pid) is None, m


def test_a_child_started_in_the_interval_that_waited_on_the_network_is_named_for_its_wait():
    """A worker starts a curl for a shard (WebDataset's ``pipe:curl``) as the GPU goes idle,
    and curl waits on the server through the interval: net_wait naming curl, not the
    workers_start hint. The same start-up without the wait stays workers_start, and one that
    computes too (a worker's own start-up) stays workers_start."""
    curl = 4321

    def world(waits, busy=None):
        b = _net_world(waits)[0]
        proc = b.tables["proc"]
        rows = [{k: proc[k][i] for k in proc} for i in range(len(proc["pid"]))]
        rows.append({**rows[1], "pid": curl, "ppid": WORKER, "comm": "curl", "start_ns": T0 + 3 * S + 20 * MS})
        b.tables["proc"] = table("proc", rows)
        b.tables["cpu"] = table("cpu", [{k: b.tables["cpu"][k][i] for k in b.tables["cpu"]}
                                        for i in range(len(b.tables["cpu"]["pid"]))]
                                + _cpu_rows(curl, busy or [0.0] * 20))
        return [b]
    v = analyze(world(_waits(curl, range(6, 11)))).verdicts[0]
    assert (v.klass, v.process["pid"], v.process["comm"]) == ("net_wait", curl, "curl"), (v.klass, v.process)
    assert analyze(world([])).verdicts[0].klass == "workers_start"
    assert analyze(world([], busy=[0.0] * 6 + [0.9] * 4 + [0.0] * 10)).verdicts[0].klass == "workers_start"

"""TCP retransmits provoked in a private network namespace, counted against nstat."""

import os

import pytest

from tests.bpf.tracerun import Trace
from tests.fixtures.netfault import LossyNetns

pytestmark = pytest.mark.bpf
PORT = 47011


def tracefs_without_family_fields(tmp_path) -> str:
    """A tracefs view for the tracer's checks in which tcp_retransmit_skb and
    tcp_retransmit_synack have no ``family`` field, as before Linux 5.11 (BCC still attaches
    through the real tracefs): the tracer must read the family from the socket."""
    real = "/sys/kernel/tracing/events"
    fake = tmp_path / "tracing" / "events"
    (fake / "tcp").mkdir(parents=True)
    for sub in os.listdir(real):
        if sub != "tcp":
            os.symlink(os.path.join(real, sub), fake / sub)
    for ev in os.listdir(os.path.join(real, "tcp")):
        src = os.path.join(real, "tcp", ev)
        if ev not in ("tcp_retransmit_skb", "tcp_retransmit_synack"):
            os.symlink(src, fake / "tcp" / ev)
            continue
        (fake / "tcp" / ev).mkdir()
        for f in os.listdir(src):
            if f != "format":
                os.symlink(os.path.join(src, f), fake / "tcp" / ev / f)
        with open(os.path.join(src, "format")) as fmt:
            lines = [ln for ln in fmt if " family;" not in ln]
        assert len(lines) < sum(1 for _ in open(os.path.join(src, "format"))), "no family field to hide"
        (fake / "tcp" / ev / "format").write_text("".join(lines))
    return str(fake.parent)


@pytest.mark.parametrize("family_from", ["tracepoint", "socket"])
def test_retransmits_match_nstat_with_ports_and_owner(tmp_path, family_from):
    env = {"STALLSCOPE_TRACEFS": tracefs_without_family_fields(tmp_path)} if family_from == "socket" else {}
    with LossyNetns(port=PORT, drop_percent=20) as ns:
        with Trace("--families", "tcp", families="tcp", env=env) as t:
            ex = ns.run_exchange(n_messages=300, size=512)
            truth = ns.settled_retrans()
        t.stop(timeout_s=60)
    assert t.rc == 0, t.stderr
    assert ex.retrans_segs >= 5, "the lossy namespace produced too few retransmits to test"
    # the tracer sees every namespace: keep this exchange's flow (both directions)
    flows = [e for e in t.events if e["type"] == "net" and {e["sport"], e["dport"]} == {PORT, ex.client_port}
             and e["saddr"] == "127.0.0.1" and e["daddr"] == "127.0.0.1"]
    assert sum(e["retransmits"] for e in flows) == truth, flows
    # teardown retransmits (FIN in LAST_ACK) come after the sockets are gone:
    # the owner is only required while the exchange ran
    for e in [e for e in flows if e["ts_ns"] <= ex.end_wall_ns]:
        assert e["op"] == "retransmit"
        # the client's port on one side, the server's on the other
        assert {e["sport"], e["dport"]} == {PORT, ex.client_port}
        # owner from the socket, even though the tracepoint fires in softirq
        if e["sport"] == PORT:
            assert e["pid"] == ex.server_pid, e
        else:
            assert e["pid"] == ex.client_pid, e
        assert e["dur_ns"] > 0 and e["state"]
        for k in ("ts_ns", "dur_ns", "pid", "tid", "comm", "node", "saddr", "sport", "daddr", "dport"):
            assert k in e


WAIT_PORT = 47013
# A client inside the namespace: connect, then on each line from stdin send one 512-byte
# request and wait for its echo; print the wall-clock send and reply times.
_WAITER = r"""
import json, socket, sys, threading, time
port = int(sys.argv[1])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(1)
def echo():
    c, _ = ls.accept()
    while True:
        d = c.recv(65536)
        if not d:
            return
        c.sendall(d)
threading.Thread(target=echo, daemon=True).start()
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print(json.dumps({"ready": True, "sport": s.getsockname()[1]}), flush=True)
for line in sys.stdin:
    t0 = time.time_ns()
    s.sendall(b"x" * 512)
    got = 0
    while got < 512:
        got += len(s.recv(512 - got))
    print(json.dumps({"send_ns": t0, "reply_ns": time.time_ns()}), flush=True)
"""


def test_loss_episode_covers_the_applications_wait():
    """A request whose packets are dropped for 0.5 s: the loss episode must span the
    application's own wait (first transmission -> acknowledgement), not start one RTO
    late and end one RTO after the data got through."""
    import json
    import subprocess
    import sys
    import threading
    import time

    with LossyNetns(port=WAIT_PORT, drop_percent=0) as ns:
        with Trace("--families", "tcp", families="tcp") as t:
            p = subprocess.Popen(ns.exec_argv([sys.executable, "-c", _WAITER, str(WAIT_PORT)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                sport = json.loads(p.stdout.readline())["sport"]
                waits = []
                for _ in range(3):
                    ns.set_drop(100)
                    threading.Timer(0.5, ns.set_drop, args=(0,)).start()
                    p.stdin.write("go\n")
                    p.stdin.flush()
                    waits.append(json.loads(p.stdout.readline()))
                    time.sleep(1.5)          # the episode closes after a 1 s gap
            finally:
                p.kill()
                p.wait()
        t.stop(timeout_s=60)
    assert t.rc == 0, t.stderr
    eps = [e for e in t.events if e["type"] == "net" and e["sport"] == sport and e["dport"] == WAIT_PORT]
    for w in waits:
        wait_ms = (w["reply_ns"] - w["send_ns"]) / 1e6
        assert wait_ms >= 450, w                   # the drop really held the request back
        mine = [e for e in eps if e["ts_ns"] < w["reply_ns"] and e["ts_ns"] + e["dur_ns"] > w["send_ns"]]
        assert len(mine) == 1, (w, eps)
        e = mine[0]
        start_err = (e["ts_ns"] - w["send_ns"]) / 1e6
        end_err = (e["ts_ns"] + e["dur_ns"] - w["reply_ns"]) / 1e6
        # the first transmission is the application's send; the ack comes with the reply
        assert -20 <= start_err <= 20, (start_err, e, w)
        assert -20 <= end_err <= 20, (end_err, e, w)


GONE_PORT = 47017
# Inside the namespace: a listener; an acceptor and a client, each a process of its own,
# connect; on "go" each writes 8 KiB (the client also reads the acceptor's), closes its
# socket and exits at once. The kernel keeps
# retransmitting the orphaned sockets' data after both processes are gone.
_GONE = r"""
import json, os, socket, sys
port = int(sys.argv[1])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(4)
go_r, go_w = os.pipe()
def child(name, make):
    pid = os.fork()
    if pid:
        return pid
    with open("/proc/self/comm", "w") as f:
        f.write(name)
    s = make()
    print(json.dumps({"who": name, "pid": os.getpid(), "local": s.getsockname()[1],
                      "remote": s.getpeername()[1]}), flush=True)
    os.read(go_r, 1)
    s.sendall(b"d" * 8192)
    got = 0
    while name == "ss-client" and got < 8192:   # unread data at close would reset the socket
        got += len(s.recv(65536))
    s.close()
    os._exit(0)
acc = child("ss-acceptor", lambda: ls.accept()[0])
cli = child("ss-client", lambda: socket.create_connection(("127.0.0.1", port)))
sys.stdin.readline()
os.write(go_w, b"gg")
for p in (acc, cli):
    os.waitpid(p, 0)
print(json.dumps({"exited": True}), flush=True)
"""


def test_owner_of_a_socket_whose_process_has_exited():
    """A process writes, closes its socket and exits; the kernel retransmits the orphaned
    socket's data afterwards, when no fd table holds it any more. The episode still names the
    process that connected (the client) or accepted (the acceptor) it, and its comm: both
    noted in the kernel when the connection was made, not looked up in /proc afterwards."""
    import json
    import subprocess
    import sys
    import time

    with LossyNetns(port=GONE_PORT, drop_percent=0) as ns:
        with Trace("--families", "tcp", families="tcp") as t:
            p = subprocess.Popen(ns.exec_argv([sys.executable, "-c", _GONE, str(GONE_PORT)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                who = {}
                for _ in range(2):
                    r = json.loads(p.stdout.readline())
                    who[r["who"]] = r
                ns.set_drop(100)        # data and ACKs to the listener's port are lost
                p.stdin.write("go\n")
                p.stdin.flush()
                assert json.loads(p.stdout.readline())["exited"]
                time.sleep(1.5)         # retransmits of both orphans, their processes gone
                ns.set_drop(0)
                time.sleep(2.0)         # delivered; the episodes close after a 1 s gap
            finally:
                p.kill()
                p.wait()
        t.stop(timeout_s=60)
    assert t.rc == 0, t.stderr
    cli, acc = who["ss-client"], who["ss-acceptor"]
    net = [e for e in t.events if e["type"] == "net"]
    to_server = [e for e in net if e["sport"] == cli["local"] and e["dport"] == GONE_PORT]
    to_client = [e for e in net if e["sport"] == GONE_PORT and e["dport"] == cli["local"]]
    assert to_server and to_client, (who, net)
    for e in to_server:
        assert (e["pid"], e["comm"]) == (cli["pid"], "ss-client"), e
    for e in to_client:
        assert (e["pid"], e["comm"]) == (acc["pid"], "ss-acceptor"), e

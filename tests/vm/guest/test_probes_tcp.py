"""TCP retransmits under netem loss in the guest, counted against the namespace's TcpRetransSegs.

A private network namespace (tests/fixtures/netfault.py, with no nftables drop) gets a netem
qdisc on its loopback that drops 10% of the packets in both directions; a bounded
request/echo exchange there retransmits. The shared tracer (`--families vfs,tcp`: the
tcp:tcp_retransmit_skb tracepoint plus tcp_sock.total_retrans) runs in the initial
namespace and sees it; the retransmits it reports on that flow must equal the growth of
the namespace's own TcpRetransSegs (what `nstat` shows there).
"""

from __future__ import annotations

import time

import pytest

from guestutil import run
from probe_env import TCP_NEEDS, kernel_lacks
from tests.fixtures.netfault import LossyNetns

PORT = 47013


@pytest.mark.matrix("TCP retransmits (netem loss)", "tracepoint")
def test_tcp_retransmits_match_nstat_under_netem_loss(probe_tracers, matrix_unavailable):
    t = probe_tracers.vfs_tcp
    t.wait_ready()
    why = kernel_lacks("tcp", t.stderr, TCP_NEEDS)
    if why:
        return matrix_unavailable(why)
    assert "tcp: tracepoints tcp/tcp_retransmit_skb" in t.stderr, t.stderr
    run("modprobe", "sch_netem")
    with LossyNetns(port=PORT, drop_percent=0, rto_min_ms=20) as ns:
        run(*ns.exec_argv(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", "10%"]))
        ex = ns.run_exchange(n_messages=200, size=512, timeout_s=120)
        truth = ns.settled_retrans(timeout_s=60)
        nstat = run(*ns.exec_argv(["nstat", "-az", "TcpRetransSegs"]))
    assert ex.retrans_segs >= 5, f"only {ex.retrans_segs} retransmits under 10% loss: too few to test"
    assert str(truth) in nstat.split(), nstat

    def flow(e):
        return (e["type"] == "net" and {e["sport"], e["dport"]} == {PORT, ex.client_port}
                and e["saddr"] == "127.0.0.1" and e["daddr"] == "127.0.0.1")

    deadline = time.monotonic() + 20            # loss episodes close 1 s after their last retransmit
    while sum(e["retransmits"] for e in t.events(flow)) < truth and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.5)
    events = t.events(flow)
    # what to look at if this ever differs: each episode (socket inode, state, count), JSON
    # lines the reader could not parse, and the tracer's own loss lines
    seen = {"episodes": [(e["ts_ns"], e.get("sock_ino"), e.get("state"), e["sport"], e["retransmits"])
                        for e in events],
           "unparsed_stdout": t.unparsed[-5:],
           "tracer_stderr": [x for x in t.stderr.splitlines() if "lost" in x or "drop" in x][-10:]}
    assert sum(e["retransmits"] for e in events) == truth, seen
    for e in events:
        if e["ts_ns"] <= ex.end_wall_ns:        # while the exchange ran: its processes own the flow
            assert e["pid"] == (ex.server_pid if e["sport"] == PORT else ex.client_pid), (e, seen)

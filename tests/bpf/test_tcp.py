"""TCP retransmits provoked in a private network namespace, counted against nstat."""

import pytest

from tests.bpf.tracerun import Trace
from tests.fixtures.netfault import LossyNetns

pytestmark = pytest.mark.bpf
PORT = 47011


def test_retransmits_match_nstat_with_ports_and_owner():
    with LossyNetns(port=PORT, drop_percent=20) as ns:
        with Trace("--families", "tcp", families="tcp") as t:
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

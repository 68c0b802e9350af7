"""RDMA port counters as deltas (tracer/rdma_counters.py), on a fixture sysfs tree."""

from pathlib import Path

from stallscope.tracer.rdma_counters import RdmaCounterSampler


def _write(root: Path, dev: str, port: int, group: str, name: str, value):
    p = root / dev / "ports" / str(port) / group
    p.mkdir(parents=True, exist_ok=True)
    (p / name).write_text(f"{value}\n")


def _rows(got):
    t = got["rdma_counter"]
    return {(d, int(p), c): (int(delta), int(ts), int(dur))
            for d, p, c, delta, ts, dur in zip(t["device"], t["port"], t["counter"], t["delta"], t["ts_ns"],
                                               t["dur_ns"])}


def test_first_poll_is_a_baseline_then_only_moved_counters_come_back(tmp_path):
    _write(tmp_path, "mlx5_0", 1, "hw_counters", "out_of_sequence", 10)
    _write(tmp_path, "mlx5_0", 1, "hw_counters", "np_cnp_sent", 3)
    _write(tmp_path, "mlx5_0", 1, "hw_counters", "lifespan", 10)        # a period, not a counter
    _write(tmp_path, "mlx5_0", 1, "counters", "port_xmit_wait", 1000)
    s = RdmaCounterSampler.open(str(tmp_path))
    assert s.poll(now_ns=1_000) is None
    _write(tmp_path, "mlx5_0", 1, "hw_counters", "out_of_sequence", 17)
    _write(tmp_path, "mlx5_0", 1, "counters", "port_xmit_wait", 1023)
    _write(tmp_path, "mlx5_0", 1, "hw_counters", "lifespan", 12)
    assert _rows(s.poll(now_ns=3_000)) == {
        ("mlx5_0", 1, "hw_counters/out_of_sequence"): (7, 1_000, 2_000),
        ("mlx5_0", 1, "counters/port_xmit_wait"): (23, 1_000, 2_000),
    }
    assert s.poll(now_ns=4_000) is None


def test_new_devices_start_with_a_baseline_and_resets_are_not_deltas(tmp_path):
    _write(tmp_path, "rxe0", 1, "hw_counters", "completer_retry_err", 5)
    s = RdmaCounterSampler(str(tmp_path))
    s.poll(now_ns=1)
    _write(tmp_path, "rxe1", 1, "hw_counters", "rcvd_seq_err", 9)          # appears later
    _write(tmp_path, "rxe0", 1, "hw_counters", "completer_retry_err", 2)   # went backwards: reset
    assert s.poll(now_ns=2) is None
    _write(tmp_path, "rxe1", 1, "hw_counters", "rcvd_seq_err", 11)
    _write(tmp_path, "rxe0", 1, "hw_counters", "completer_retry_err", 4)
    assert _rows(s.poll(now_ns=3)) == {("rxe1", 1, "hw_counters/rcvd_seq_err"): (2, 2, 1),
                                       ("rxe0", 1, "hw_counters/completer_retry_err"): (2, 2, 1)}


def test_a_node_without_rdma_gets_no_sampler_and_unreadable_files_are_skipped(tmp_path):
    assert RdmaCounterSampler.open(str(tmp_path / "absent")) is None
    _write(tmp_path, "rxe0", 1, "hw_counters", "garbage", "n/a")
    s = RdmaCounterSampler(str(tmp_path))
    assert s.read() == {} and s.errors == 1

"""The tracer's spool (wire/spool.py): append, read back, acknowledge, roll segments, replay
after a restart, stay bounded, and survive a torn or damaged record."""

import errno
import json
import os
import time

import pytest

from stallscope.wire import spool as spool_mod
from stallscope.wire.spool import REC, Spool, SpoolError


def payload(i, size=100):
    return (f"batch-{i}:".encode() * size)[:size]


def fill(sp, n, size=100):
    seqs = []
    for i in range(n):
        seq = sp.next_seq
        assert sp.append(seq, payload(i, size))
        seqs.append(seq)
    return seqs


def segments(path):
    return sorted(n for n in os.listdir(path) if n.startswith("seg-"))


def test_append_read_ack_in_order(tmp_path):
    sp = Spool(str(tmp_path), max_bytes=1 << 20)
    seqs = fill(sp, 11)
    assert seqs == list(range(seqs[0], seqs[0] + 11))
    got = sp.read_next(4, 1 << 20)
    assert [s for s, _ in got] == seqs[:4] and got[0][1] == payload(0)
    got += sp.read_next(100, 1 << 20)
    assert [s for s, _ in got] == seqs and [p for _, p in got] == [payload(i) for i in range(11)]
    assert sp.read_next(10, 1 << 20) == []              # caught up with the writer
    assert sp.pending_records() == 11
    sp.ack_through(seqs[6])
    assert sp.pending_records() == 4
    assert sp.pending_bytes() == 4 * (REC.size + 100)
    sp.close()


def test_read_next_honours_the_byte_budget_but_always_gives_one(tmp_path):
    sp = Spool(str(tmp_path))
    fill(sp, 5, size=1000)
    assert len(sp.read_next(10, 2500)) == 2
    assert len(sp.read_next(10, 10)) == 1               # larger than the budget: alone
    sp.close()


def test_restart_replays_only_the_unacknowledged_and_keeps_numbering(tmp_path):
    sp = Spool(str(tmp_path), max_bytes=1 << 20)
    seqs = fill(sp, 13)
    sp.read_next(100, 1 << 20)
    sp.ack_through(seqs[4])
    sp.close()                                          # cursor persisted
    st = json.load(open(tmp_path / "state.json"))
    assert st["acked_through"] == seqs[4] and st["next_seq"] == seqs[-1] + 1
    sp2 = Spool(str(tmp_path), max_bytes=1 << 20)
    assert sp2.replayed == 8
    assert sp2.next_seq > seqs[-1]
    got = sp2.read_next(100, 1 << 20)
    assert [s for s, _ in got] == seqs[5:]
    assert [p for _, p in got] == [payload(i) for i in range(5, 13)]
    new = fill(sp2, 2)
    assert sp2.read_next(10, 1 << 20) == [(new[0], payload(0)), (new[1], payload(1))]
    sp2.close()


def test_lost_state_resends_everything_spooled(tmp_path):
    sp = Spool(str(tmp_path))
    seqs = fill(sp, 3)
    sp.ack_through(seqs[1])
    sp.close()
    (tmp_path / "state.json").write_text("{not json")
    logs = []
    sp2 = Spool(str(tmp_path), log=logs.append)
    assert [s for s, _ in sp2.read_next(10, 1 << 20)] == seqs     # duplicates are the collector's to drop
    assert any("unreadable" in m for m in logs)
    sp2.close()


def test_segments_roll_and_acknowledged_ones_are_deleted(tmp_path):
    sp = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1000)
    seqs = fill(sp, 23)                      # 116 bytes per record: 8 per segment
    assert len(segments(tmp_path)) == 3
    sp.read_next(100, 1 << 20)
    sp.ack_through(seqs[7])                  # the whole first segment
    assert len(segments(tmp_path)) == 2
    sp.ack_through(seqs[20])
    assert len(segments(tmp_path)) == 1      # the active one stays while it has unacked records
    assert sp.total_bytes == 7 * 116
    sp.ack_through(seqs[-1])                 # ... and goes once it has none: acked bytes hold no room
    assert segments(tmp_path) == [] and sp.total_bytes == 0
    more = fill(sp, 9)                       # the next append starts a fresh file
    assert len(segments(tmp_path)) == 2
    assert [s for s, _ in sp.read_next(100, 1 << 20)] == more
    sp.ack_through(more[-1])
    assert segments(tmp_path) == [] and sp.pending_records() == 0
    sp.close()
    sp2 = Spool(str(tmp_path))
    assert sp2.replayed == 0 and sp2.next_seq > more[-1]       # the state remembers the numbering
    sp2.close()


def test_a_tiny_spool_never_jams_once_everything_is_acknowledged(tmp_path):
    sp = Spool(str(tmp_path), max_bytes=5 * 116, segment_bytes=4096)   # segments larger than the bound
    for _round in range(4):
        while sp.append(sp.next_seq, payload(1)):
            pass
        got = sp.read_next(100, 1 << 20)
        assert len(got) == 5
        sp.ack_through(got[-1][0])
    assert sp.refused_full == 4 and sp.pending_records() == 0
    sp.close()


def test_bounded_refuses_when_full_and_takes_again_after_acks(tmp_path):
    sp = Spool(str(tmp_path), max_bytes=10 * 116 - 1, segment_bytes=3 * 116)   # room for 9 records
    ok = [sp.append(sp.next_seq, payload(i)) for i in range(13)]
    assert ok.count(True) == 9 and not any(ok[9:])
    assert sp.refused_full == 4 and "spool full" in sp.last_error
    got = sp.read_next(100, 1 << 20)
    assert len(got) == 9
    sp.ack_through(got[2][0])                           # frees the first segment
    assert sp.append(sp.next_seq, payload(99))
    sp.close()


def test_torn_tail_after_a_crash_is_cut_reported_not_fatal(tmp_path):
    sp = Spool(str(tmp_path))
    seqs = fill(sp, 7)
    sp.close()
    seg = tmp_path / segments(tmp_path)[-1]
    with open(seg, "ab") as f:                           # a record half written when the power went
        f.write(REC.pack(100, 0, seqs[-1] + 1) + b"x" * 40)
    logs = []
    sp2 = Spool(str(tmp_path), log=logs.append)
    assert sp2.corrupt_records == 1 and sp2.discarded_bytes == REC.size + 40
    assert any("damaged" in m for m in logs)
    assert [s for s, _ in sp2.read_next(100, 1 << 20)] == seqs
    assert os.path.getsize(seg) == 7 * (REC.size + 100)   # cut back: appends continue cleanly
    new = fill(sp2, 1)
    sp2.close()
    sp3 = Spool(str(tmp_path))
    assert [s for s, _ in sp3.read_next(100, 1 << 20)] == seqs + new and sp3.corrupt_records == 0
    sp3.close()


def test_a_flipped_bit_fails_the_crc_and_keeps_the_records_before_it(tmp_path):
    sp = Spool(str(tmp_path))
    seqs = fill(sp, 5)
    sp.close()
    seg = tmp_path / segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[3 * (REC.size + 100) + REC.size + 10] ^= 0x40    # inside the 4th record's payload
    seg.write_bytes(bytes(data))
    logs = []
    sp2 = Spool(str(tmp_path), log=logs.append)
    assert sp2.corrupt_records == 1 and logs
    assert [s for s, _ in sp2.read_next(100, 1 << 20)] == seqs[:3]
    sp2.close()


def test_damage_found_on_read_back_skips_that_segment(tmp_path):
    sp = Spool(str(tmp_path), segment_bytes=3 * 116)
    seqs = fill(sp, 6)
    first = tmp_path / segments(tmp_path)[0]
    with open(first, "r+b") as f:                        # bit rot after the open-time check
        f.seek(116 + REC.size + 5)                       # the second record's payload
        f.write(b"\xff")
    logs = []
    sp.log = logs.append
    got = sp.read_next(100, 1 << 20)
    assert [s for s, _ in got] == [seqs[0]] + seqs[3:]
    assert sp.corrupt_records == 1 and "damaged" in logs[0]
    sp.close()


def test_disk_errors_refuse_the_record_and_leave_no_half_record(tmp_path, monkeypatch):
    sp = Spool(str(tmp_path))
    fill(sp, 2)
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, data[:7])                         # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(spool_mod.os, "write", full_disk)
    assert not sp.append(sp.next_seq, payload(5))
    assert sp.refused_error == 1 and "disk full" in sp.last_error
    monkeypatch.setattr(spool_mod.os, "write", real_write)
    seq = sp.next_seq
    assert sp.append(seq, payload(6))
    sp.close()
    sp2 = Spool(str(tmp_path))
    got = sp2.read_next(10, 1 << 20)
    assert sp2.corrupt_records == 0 and got[-1] == (seq, payload(6)) and len(got) == 3
    sp2.close()


def test_one_tracer_per_spool_directory(tmp_path):
    sp = Spool(str(tmp_path))
    with pytest.raises(SpoolError, match=f"in use by another tracer \\(pid {os.getpid()}\\)"):
        Spool(str(tmp_path))
    sp.close()
    Spool(str(tmp_path)).close()                         # released at close


def test_sequence_never_goes_back_even_without_state(tmp_path):
    t0 = spool_mod.boot_time_ms()
    sp = Spool(str(tmp_path / "a"))
    seqs = fill(sp, 3)
    sp.close()
    assert seqs[0] >= t0
    time.sleep(0.01)            # a restart takes far longer; a tracer numbers < 1 batch per ms
    # a wiped spool directory in the same boot still numbers above what was sent
    fresh = Spool(str(tmp_path / "b"))
    assert fresh.next_seq > seqs[-1]
    fresh.close()


def test_unwritable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="cannot open spool directory"):
        Spool(str(tmp_path / "file" / "spool"))


def test_default_spool_dir_for_users(monkeypatch):
    monkeypatch.setattr(spool_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert spool_mod.default_spool_dir() == "/home/u/.state/stallscope/spool"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert spool_mod.default_spool_dir() == "/home/u/.local/state/stallscope/spool"
    monkeypatch.setattr(spool_mod.os, "geteuid", lambda: 0)
    assert spool_mod.default_spool_dir() == "/var/lib/stallscope/spool"

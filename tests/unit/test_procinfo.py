"""ProcCache with kernel lineage (fork/exec/exit records), and the sched family's decode:
records -> _proc/_sched columns -> sched and io (page fault) tables."""

import time

import numpy as np
import pytest

from stallscope.tracer import procinfo
from stallscope.tracer.decode import split
from stallscope.tracer.families import sched
from stallscope.wire.schema import ENUMS, RECORD_DTYPE, T_PROC, T_SCHED

S = 1_000_000_000
T = time.time_ns() - 60 * S    # lineage times: now-ish, after the fixture processes started


def at(sec):
    """Wall ns ``sec`` seconds after T."""
    return T + int(sec * S)


def _fake_proc(root, pid, ppid, comm, env=None):
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0\n")
    (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in (env or {}).items()) + b"\0")


def _lineage(rows):
    """A _proc table from (ts_ns, op, pid, ppid, comm) rows."""
    cols = list(zip(*rows))
    return {"ts_ns": np.array(cols[0], dtype=np.uint64), "op": np.array(cols[1], dtype=object),
            "pid": np.array(cols[2], dtype=np.uint64), "ppid": np.array(cols[3], dtype=np.uint64),
            "comm": np.array(cols[4], dtype=object)}


def _rows(t):
    return sorted((int(p), int(pp), c, int(s), j, int(r)) for p, pp, c, s, j, r in
                  zip(t["pid"], t["ppid"], t["comm"], t["start_ns"], t["job"], t["rank"]))


@pytest.fixture
def tree(tmp_path):
    """/proc with a launcher (100) and a trainer (200) that existed before tracing."""
    (tmp_path / "stat").write_text("cpu 0\nbtime 1700000000\n")
    _fake_proc(tmp_path, 100, 1, "torchrun", {"TORCHELASTIC_RUN_ID": "job7"})
    _fake_proc(tmp_path, 200, 100, "python", {"TORCHELASTIC_RUN_ID": "job7", "RANK": "3"})
    return tmp_path


def test_worker_gone_from_proc_is_known_from_kernel_records(tree):
    """A worker that forked, stalled and exited before anyone looked: its row comes from the
    fork record (parent, start time, inherited job and rank), /proc has nothing on it."""
    pc = procinfo.ProcCache(str(tree))
    pc.kernel_lineage(at(10))
    pc.ingest(_lineage([(at(11), "fork", 300, 200, "python"), (at(12), "exit", 300, 200, "python")]))
    assert not (tree / "300").exists()
    t = pc.table_for([300], [at(11.5)])
    assert _rows(t)[-1] == (300, 200, "python", at(11), "job7", 3)
    assert {int(p) for p in t["pid"]} == {300, 200, 100}           # with its ancestors
    assert pc.table_for([300], [at(11.5)]) == {}             # reported once
    assert pc.lookup(300) == (200, "python", at(11), "job7", 3)


def test_pid_reuse_never_mislabels(tree):
    """Two incarnations of pid 300: each stall row gets the one alive at its time; a row older
    than every known incarnation gets none (and /proc, holding a third process, is not read)."""
    _fake_proc(tree, 300, 1, "unrelated")
    pc = procinfo.ProcCache(str(tree))
    pc.kernel_lineage(at(10))
    pc.ingest(_lineage([(at(11), "fork", 300, 200, "python"), (at(12), "exit", 300, 200, "python"),
                        (at(13), "fork", 300, 100, "torchrun"), (at(13) + 5, "exec", 300, 100, "sh")]))
    t = pc.table_for([300, 300, 300], [at(11.5), at(14), at(5)])
    mine = [r for r in _rows(t) if r[0] == 300]
    assert [(r[1], r[2], r[3]) for r in mine] == [(100, "sh", at(13)), (200, "python", at(11))]
    assert pc.lookup(300, at(5)) is None


def test_fork_without_exit_record_ends_the_old_incarnation(tree):
    pc = procinfo.ProcCache(str(tree))
    pc.kernel_lineage(at(10))
    pc.ingest(_lineage([(at(11), "fork", 300, 200, "a"), (at(13), "fork", 300, 100, "b")]))
    assert pc.lookup(300, at(12))[:2] == (200, "a")
    assert pc.lookup(300, at(14))[:2] == (100, "b")
    assert pc.info[300][0].exit_ns == at(13)


def test_exec_renames_and_is_reported_again(tree):
    pc = procinfo.ProcCache(str(tree))
    pc.kernel_lineage(at(10))
    pc.ingest(_lineage([(at(11), "fork", 300, 200, "python")]))
    assert _rows(pc.table_for([300], [at(11)]))[-1][2] == "python"
    pc.ingest(_lineage([(at(12), "exec", 300, 200, "pt_data_worker")]))
    t = pc.table_for([300], [at(12)])
    assert _rows(t) == [(300, 200, "pt_data_worker", at(11), "job7", 3)]   # env: the parent's


def test_expire_forgets_exited_after_grace_only(tree):
    pc = procinfo.ProcCache(str(tree), grace_s=30)
    pc.kernel_lineage(at(10))
    pc.ingest(_lineage([(at(11), "fork", 300, 200, "w"), (at(12), "exit", 300, 200, "w"),
                        (at(11), "fork", 301, 200, "w")]))
    pc.expire(now_ns=at(30))
    assert 300 in pc.info and 301 in pc.info
    pc.expire(now_ns=at(43))
    assert 300 not in pc.info and 301 in pc.info                  # 301 still runs


def test_descendants_from_proc(tree):
    _fake_proc(tree, 300, 200, "w1")
    _fake_proc(tree, 301, 300, "w2")
    _fake_proc(tree, 400, 1, "other")
    pc = procinfo.ProcCache(str(tree))
    assert pc.descendants([200]) == {300, 301}
    assert pc.descendants([100]) == {200, 300, 301}


# ---------------------------------------------------------------------- sched decode

def _rec(**kw):
    r = np.zeros(1, dtype=RECORD_DTYPE)
    for k, v in kw.items():
        r[k] = v
    return r


class _Table(dict):
    Key = staticmethod(int)
    Leaf = staticmethod(int)


class _Bpf:
    def __init__(self):
        self.tables = {b"owners": _Table(), b"threads": _Table(), b"stacks": _Table(), b"sclass": _Table(),
                       b"ogen": _Table(), b"ripe": _Table()}

    def __getitem__(self, k):
        return self.tables[k]

    def load_func(self, name, kind):
        return type("F", (), {"fd": -1})()


FUSE = ["bpf_prog_1_raw_tracepoint__sched_switch", "bpf_trace_run4", "__schedule", "schedule",
        "request_wait_answer", "__fuse_simple_request", "fuse_direct_io", "fuse_file_read_iter",
        "vfs_read"]
PIPE = ["_einittext", "bpf_trace_run4", "__schedule", "schedule", "anon_pipe_read", "vfs_read",
        "ksys_read"]
BLK = ["x", "bpf_trace_run4", "__schedule", "schedule", "io_schedule", "folio_wait_bit_common",
       "filemap_read", "vfs_read"]


def _runtime(tmp_path, min_ns=10_000_000):
    rt = sched.Runtime(_Bpf(), min_ns, str(tmp_path))
    rt.frames.update({5: BLK, 6: PIPE, 7: FUSE, -17: []})
    return rt


def test_stack_reasons_and_classes():
    assert sched.reason_of(FUSE) == "request_wait_answer < __fuse_simple_request < fuse_direct_io"
    assert sched.reason_of(BLK) == "filemap_read < vfs_read"
    assert sched.reason_of([]) == "[stack lost]"
    assert sched.is_voluntary(PIPE) and not sched.is_voluntary(FUSE) and not sched.is_voluntary(BLK)
    # a frame above __schedule (the tracing program, named as kallsyms had it) never counts
    assert not sched.is_voluntary(["futex_wait_bpf_prog", "__schedule", "schedule",
                                   "request_wait_answer"])


def test_proc_records_decode():
    recs = np.concatenate([_rec(type=T_PROC, op=ENUMS["SS_OP_FORK"], pid=300, tid=300, key=200,
                                ts_ns=5, comm=b"python"),
                           _rec(type=T_PROC, op=ENUMS["SS_OP_EXIT"], pid=300, tid=300, key=200,
                                ts_ns=9, comm=b"pt_data_worker")])
    t = split(recs, 1000, {T_PROC: "tracepoint"})["_proc"]
    assert list(t["op"]) == ["fork", "exit"] and list(t["ppid"]) == [200, 200]
    assert list(t["ts_ns"]) == [1005, 1009] and list(t["comm"]) == ["python", "pt_data_worker"]


def test_sched_records_to_tables(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        "36 25 0:40 / /mnt rw - fuse.stallscope-slowfs stallscope-slowfs rw\n"
        "21 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "maps").write_text(
        "55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234 /usr/bin/python3.11\n"
        "7f0000000000-7f0000100000 r--p 00000000 00:28 2 /mnt/slow-mapped.bin\n"
        "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n")
    blocked, runq, fault = ENUMS["SS_OP_BLOCKED"], ENUMS["SS_OP_RUNQ"], ENUMS["SS_OP_PAGE_FAULT"]
    recs = np.concatenate([
        # D-state group: 3 spells, 40 ms off-CPU in 60 ms
        _rec(type=T_SCHED, op=blocked, pid=42, tid=43, ts_ns=100, dur_ns=60_000_000, ret=40_000_000,
             aux=3, key=5, state=1, comm=b"reader"),
        # S-state sleeps not classified yet: a pipe read (voluntary) and a FUSE wait (a stall)
        _rec(type=T_SCHED, op=blocked, pid=42, tid=44, ts_ns=200, dur_ns=500_000_000, ret=500_000_000,
             aux=1, key=6, state=3, comm=b"main"),
        _rec(type=T_SCHED, op=blocked, pid=42, tid=43, ts_ns=300, dur_ns=500_000_000, ret=500_000_000,
             aux=1, key=7, state=3, comm=b"reader"),
        # ... and a FUSE wait of 2 ms: classified, but below the threshold
        _rec(type=T_SCHED, op=blocked, pid=42, tid=45, ts_ns=350, dur_ns=2_000_000, ret=2_000_000,
             aux=1, key=7, state=3, comm=b"reader"),
        # runq: other pid in aux, spells in dev, other comm in path
        _rec(type=T_SCHED, op=runq, pid=42, tid=42, ts_ns=400, dur_ns=900_000_000, ret=600_000_000,
             aux=77, dev=31, state=4, path=b"ss_hog", comm=b"trainer"),
        # page faults: a mapped file, anonymous memory, a process that is gone
        _rec(type=T_SCHED, op=fault, pid=42, tid=42, ts_ns=500, dur_ns=900_000_000, ret=850_000_000,
             aux=3, key=0x7F0000040123, state=1, comm=b"trainer"),
        _rec(type=T_SCHED, op=fault, pid=42, tid=42, ts_ns=600, dur_ns=20_000_000, ret=20_000_000,
             aux=1, key=0x7F0000200010, state=1, comm=b"trainer"),
        _rec(type=T_SCHED, op=fault, pid=99, tid=99, ts_ns=700, dur_ns=20_000_000, ret=20_000_000,
             aux=1, key=0x7F0000040123, state=1, comm=b"gone"),
    ])
    raw = split(recs, 0, {T_SCHED: "tracepoint"})["_sched"]
    rt = _runtime(tmp_path)
    out = rt.resolve(raw)

    s = out["sched"]
    got = [(int(t), o, r, int(c), int(b), int(op), oc) for t, o, r, c, b, op, oc in
           zip(s["tid"], s["op"], s["reason"], s["count"], s["blocked_ns"], s["other_pid"], s["other_comm"])]
    assert got == [(43, "blocked", "filemap_read < vfs_read", 3, 40_000_000, 0, ""),
                   (43, "blocked", "request_wait_answer < __fuse_simple_request < fuse_direct_io", 1,
                    500_000_000, 0, ""),
                   (42, "runq", "preempted", 31, 600_000_000, 77, "ss_hog")]
    # the kernel is told how to treat these stacks from now on
    assert rt.sclass == {6: sched.CLASS_VOLUNTARY, 7: sched.CLASS_STALL}

    io = out["io"]
    rows = list(zip(io["pid"], io["op"], io["path"], io["fs"], io["count"], io["blocked_ns"], io["bytes"],
                    io["ino"], io["method"]))
    assert rows == [(42, "page_fault", "/mnt/slow-mapped.bin", "fuse", 3, 850_000_000, 0, 2, "tracepoint"),
                    (42, "page_fault", "[anon]", "", 1, 20_000_000, 0, 0, "tracepoint"),
                    (99, "page_fault", sched.UNKNOWN_MAPPING, "", 1, 20_000_000, 0, 0, "tracepoint")]
    assert int(io["dev"][0]) == 0x28       # 00:28 as the kernel encodes dev_t (major << 20 | minor)


def test_maps_cache_keeps_what_it_read_while_the_process_lived(tmp_path):
    d = tmp_path / "42"
    d.mkdir()
    (d / "maps").write_text("7f0000000000-7f0000100000 r--p 00000000 00:28 2 /data/a.bin\n")
    mc = sched.MapsCache(str(tmp_path))
    assert mc.resolve(42, 0x7F0000000010)[0] == "/data/a.bin"
    (d / "maps").unlink()
    d.rmdir()                                   # the process exits
    assert mc.resolve(42, 0x7F00000FFFFF)[0] == "/data/a.bin"
    assert mc.resolve(42, 0x7F0000100000)[0] == sched.UNKNOWN_MAPPING


def test_family_registered():
    from stallscope.tracer.families import ALL_FAMILIES, BY_RECORD_TYPE
    assert "sched" in ALL_FAMILIES
    assert BY_RECORD_TYPE[T_PROC] is sched and BY_RECORD_TYPE[T_SCHED] is sched


def test_maps_cache_never_takes_a_reused_address_from_an_older_copy(tmp_path):
    import time

    from stallscope.tracer.families.sched import UNKNOWN_MAPPING, MapsCache
    (tmp_path / "77").mkdir()
    maps = tmp_path / "77" / "maps"
    line = "7f0000000000-7f0000800000 r--p 00000000 00:27 {ino} {path}\n"
    maps.write_text(line.format(ino=2, path="/data/a.bin"))
    mc = MapsCache(str(tmp_path))
    assert mc.refresh(77)                                   # read while the first fault ran
    t1 = time.time_ns()
    maps.write_text(line.format(ino=4, path="/data/b.bin"))   # munmap a, mmap b at the same address
    assert mc.resolve(77, 0x7f0000100000, since_ns=t1)[0] == "/data/b.bin"
    maps.write_text("")                                     # b unmapped too before its record came
    assert mc.resolve(77, 0x7f0000100000, since_ns=t1)[0] == "/data/b.bin"     # a copy read after t1
    t2 = time.time_ns()
    assert mc.resolve(77, 0x7f0000100000, since_ns=t2)[0] == UNKNOWN_MAPPING   # not a stale guess


def test_maps_cache_names_a_faults_fs_as_vfs_rows_do(tmp_path):
    """Mountinfo says nfs4 for an NFSv4 mount and fuse.sshfs for sshfs; VFS rows name fs by
    superblock magic: "nfs" for every NFS version, "fuse" for every FUSE fs."""
    from stallscope.tracer.families.sched import MapsCache
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        "40 1 0:51 / /mnt/nfs4.2 rw - nfs4 srv:/export rw,vers=4.2\n"
        "41 1 0:52 / /mnt/nfs3 rw - nfs srv:/export rw,vers=3\n"
        "42 1 0:53 / /mnt/ssh rw - fuse.sshfs host: rw\n"
        "43 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    mc = MapsCache(str(tmp_path))
    assert [mc.fs_of(d) for d in ((0, 51), (0, 52), (0, 53), (8, 1), (9, 9))] == ["nfs", "nfs", "fuse", "ext4", ""]
    import numpy as np

    from stallscope.tracer.decode import fs_names
    assert list(fs_names(np.array([0x6969, 0x65735546, 0xEF53], dtype=np.uint64))) == ["nfs", "fuse", "ext4"]


# ---------------------------------------------------------------------- staying bounded

HZ = procinfo.os.sysconf("SC_CLK_TCK")


def _proc_aged(root, pid, ppid, comm, age_s):
    """A /proc/<pid> whose start time is ``age_s`` seconds ago (in clock ticks since boot)."""
    ticks = (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - int(age_s * S)) * HZ // S
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {ticks} 0 0\n")
    (d / "environ").write_bytes(b"")
    return ticks


def _gone(root, pid):
    for f in ("stat", "environ"):
        (root / str(pid) / f).unlink()
    (root / str(pid)).rmdir()


def test_cache_stays_bounded_while_processes_come_and_go(tree):
    """Without kernel lineage: 3000 short-lived processes over 200 s on 400 recycled pids, a
    sweep each second: the cache holds the living plus those that exited within the grace."""
    pc = procinfo.ProcCache(str(tree), grace_s=5, sweep_s=1)
    sizes, live = [], []
    for sec in range(200):
        now = time.time_ns()
        for k in range(15):
            pid = 1000 + (sec * 15 + k) % 400
            if (tree / str(pid)).exists():
                _gone(tree, pid)
            _proc_aged(tree, pid, 200, f"w{sec}", 0.5)
            live.append(pid)
        pc.table_for(live[-15:], [now] * 15)
        for pid in live[:-30]:                       # each lives ~2 s
            if (tree / str(pid)).exists():
                _gone(tree, pid)
        live = live[-30:]
        pc.sweep(now_ns=now + sec * S, force=True)
        sizes.append(len(pc))
    # 30 living + 15 per second exiting, kept 5 s (+ the fixture's two)
    assert max(sizes) <= 30 + 15 * 7 + 2, max(sizes)
    assert pc.forgotten >= 2500


def test_cap_on_exited_incarnations_spares_kept_pids(tree):
    pc = procinfo.ProcCache(str(tree), grace_s=3600, max_exited=50)
    pc.kernel_lineage(at(10))
    rows = []
    for i in range(300):
        rows += [(at(11 + i * 0.01), "fork", 5000 + i, 200, "w"), (at(11.005 + i * 0.01), "exit", 5000 + i, 200, "w")]
    pc.ingest(_lineage(rows))
    pc.sweep(now_ns=at(20), keep={5000, 5001}, force=True)
    assert len(pc) <= 50 + 2 + 2                     # the cap, the kept two, the fixture's two
    assert 5000 in pc.info and 5001 in pc.info and 5299 in pc.info and 5100 not in pc.info


def test_pid_reused_without_kernel_lineage_gets_the_new_facts(tree):
    """A pid read from /proc, then reused by another process (other start, parent, name): rows
    after the reuse get the new process, rows before it keep the old one."""
    _proc_aged(tree, 300, 200, "old-proc", 10)
    pc = procinfo.ProcCache(str(tree))
    t_old = time.time_ns() - 5 * S
    assert _rows(pc.table_for([300], [t_old]))[-1][1:3] == (200, "old-proc")
    _gone(tree, 300)
    _proc_aged(tree, 300, 100, "new-proc", 1)
    t_new = time.time_ns()
    got = _rows(pc.table_for([300], [t_new]))
    assert [r[1:3] for r in got if r[0] == 300] == [(100, "new-proc")]
    assert pc.lookup(300, t_old)[:2] == (200, "old-proc")
    assert pc.lookup(300)[:2] == (100, "new-proc")
    assert pc.reuse_seen == 1 and pc.info[300][0].exit_ns <= t_new


def test_exit_record_lost_is_found_by_the_sweep(tree):
    pc = procinfo.ProcCache(str(tree), grace_s=10)
    pc.kernel_lineage(at(10))
    pc.ingest(_lineage([(at(11), "fork", 300, 200, "w")]))       # no exit record; no /proc/300
    assert pc.lookup(200)[1] == "python"
    assert pc.sweep(now_ns=at(12))
    assert pc.info[300][-1].exit_ns == at(12)
    assert not pc.sweep(now_ns=at(13))                            # throttled
    pc.sweep(now_ns=at(23), force=True)
    assert 300 not in pc.info and 200 in pc.info                  # 200 still lives in /proc


def test_socket_owners_forget_sockets_closed_two_scans_ago(tmp_path):
    import os
    import shutil

    from stallscope.tracer.procinfo import SocketOwners

    def proc_with(sockets):
        shutil.rmtree(tmp_path / "proc", ignore_errors=True)
        for pid, inos in sockets.items():
            fd = tmp_path / "proc" / str(pid) / "fd"
            fd.mkdir(parents=True)
            for n, ino in enumerate(inos):
                os.symlink(f"socket:[{ino}]", fd / str(n))

    so = SocketOwners(str(tmp_path / "proc"), min_rescan_s=0)
    proc_with({10: range(1000, 1100)})
    assert so.owner(1000) == 10
    for gen in range(1, 20):                 # every scan sees 100 new sockets, the old ones closed
        proc_with({10 + gen: range(1000 + 100 * gen, 1100 + 100 * gen)})
        assert so.owner(1000 + 100 * gen) == 10 + gen
        assert so.owner(1000 + 100 * (gen - 1)) == 10 + gen - 1     # the previous scan's still named
    assert len(so.map) <= 200


def test_a_group_emitted_twice_is_kept_once_and_counted(tmp_path):
    """A group closed at the same moment by its thread and by ss_flush on another CPU reaches
    user space twice (seen on the 6.12 guest): the repeat (same thread, op and start) is
    dropped and counted; another group of that thread is not."""
    blocked = ENUMS["SS_OP_BLOCKED"]

    def rec(ts):
        return _rec(type=T_SCHED, op=blocked, pid=42, tid=43, ts_ns=ts, dur_ns=60_000_000, ret=40_000_000,
                    aux=3, key=5, state=1, comm=b"reader")
    rt = _runtime(tmp_path)
    first = rt.resolve(split(np.concatenate([rec(100), rec(100)]), 0, {T_SCHED: "tracepoint"})["_sched"])
    assert len(first["sched"]["tid"]) == 1 and rt.duplicates == 1
    again = rt.resolve(split(np.concatenate([rec(100), rec(900_000_000)]), 0, {T_SCHED: "tracepoint"})["_sched"])
    assert list(again["sched"]["ts_ns"]) == [900_000_000] and rt.duplicates == 2    # across drains too

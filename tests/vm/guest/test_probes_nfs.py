"""The NFS probe family on the guest's loopback NFS server (v3 and v4.2), through the real tracer.

* file ops: nfsload.py's O_DIRECT reads and writes, fsyncs, forced statx (GETATTR) and, on
  v4.2, opens (OPEN), each delayed by netem on lo, come back as nfs_read/nfs_write/
  nfs_fsync/nfs_getattr/nfs_open stalls of that pid, with the path, server 127.0.0.1:2049
  and the latency the process measured;
* RPCs: each of those O_DIRECT reads is one READ RPC, reported with its xid, server and
  procedure, owned by the reader even though rpciod completes it;
* retransmits: a read on a mount with a short RPC timeout, while netem drops every packet
  on lo, is retransmitted after the transport reconnects; the count reported equals the
  growth of /proc/net/rpc/nfs's retransmission counter;
* blame: a training loop on the simulated GPU whose dataloader reads its shards from a
  delayed NFS mount: `stallscope report` blames each idle interval on that NFS read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guestutil import run
from probe_env import LOAD_COUNT, NFS_NEEDS, REPO, kernel_lacks, summary
from test_probes_vfs import check_against_calls

NFS_OPS = {"pread": ("nfs_read", "data"), "read": ("nfs_read", "rdata"), "readv": ("nfs_read", "vdata"),
           "pwrite": ("nfs_write", "out"), "write": ("nfs_write", "wout"), "writev": ("nfs_write", "vout"),
           "fsync": ("nfs_fsync", "ckpt"), "fdatasync": ("nfs_fsync", "dckpt"),
           "statx": ("nfs_getattr", "meta"), "open": ("nfs_open", "opn")}


@pytest.mark.matrix("NFS file ops (v3, v4.2)", "kprobe")
@pytest.mark.parametrize("version", ["3", "4.2"])
def test_nfs_file_ops_by_pid_path_server_latency(probe_tracers, nfs_loads, version, matrix_unavailable):
    t = probe_tracers.nfs_rdma
    t.wait_ready()
    why = kernel_lacks("nfs", t.stderr, NFS_NEEDS)
    if why:
        return matrix_unavailable(why)
    assert "nfs: kprobe/kretprobe nfs_file_read nfs_file_write nfs_file_fsync" in t.stderr, t.stderr
    assert "raw tracepoints sunrpc:rpc_stats_latency sunrpc:xprt_retransmit (RPCs)" in t.stderr, t.stderr
    load = nfs_loads[version]
    # v3 revalidates a file during lookup (close-to-open GETATTR), before nfs_file_open: its opens are
    # not stalls of the open op. v4 sends OPEN from nfs4_file_open.
    ops = {k: v for k, v in NFS_OPS.items() if k != "open" or version != "3"}
    for op, (nfs_op, name) in ops.items():
        path = f"{load.directory}/{name}"
        evs = t.wait_events(lambda e: e["type"] == "nfs" and e["pid"] == load.pid and e["path"] == path
                            and e["op"] == nfs_op, LOAD_COUNT)
        check_against_calls(evs, load.calls(op), f"{nfs_op} {path}",
                            lambda: summary(t.events(lambda e: e["pid"] == load.pid)) + "\n" + t.stderr)
        for ev in evs:
            assert (ev["fs"], ev["server"], ev["tid"], ev["comm"]) == ("nfs", "127.0.0.1", load.tid, load.comm), ev
            assert ev["method"] == "kprobe", ev
            if nfs_op in ("nfs_read", "nfs_write"):
                assert ev["bytes"] == 4096, ev


@pytest.mark.matrix("NFS RPCs: latency, xid, server, owner", "raw tracepoint")
@pytest.mark.parametrize("version", ["3", "4.2"])
def test_nfs_read_rpcs_with_xid_server_owner(probe_tracers, nfs_loads, version, matrix_unavailable):
    t = probe_tracers.nfs_rdma
    t.wait_ready()
    why = kernel_lacks("nfs", t.stderr, NFS_NEEDS)
    if why:
        return matrix_unavailable(why)
    load = nfs_loads[version]
    prog = "nfsv3" if version == "3" else "nfsv4"
    reads = t.wait_events(lambda e: e["type"] == "nfs" and e["op"] == "nfs_rpc" and e["pid"] == load.pid
                          and e["path"] in (f"{prog} READ", f"{prog} READ_PLUS"), LOAD_COUNT)
    # one READ per O_DIRECT read, pread or readv, inside it
    calls = load.calls("pread") + load.calls("read") + load.calls("readv")
    check_against_calls(reads, calls, f"{prog} READ RPCs",
                        lambda: summary(t.events(lambda e: e["pid"] == load.pid)))
    assert len({e["xid"] for e in reads}) == len(calls) and all(e["xid"] for e in reads), reads
    for ev in reads:
        assert (ev["server"], ev["fs"], ev["rpc_retrans"]) == ("127.0.0.1", "nfs", 0), ev
        assert ev["bytes"] > 4096, ev      # the reply: RPC and NFS headers plus the 4 KiB
    getattrs = t.events(lambda e: e["type"] == "nfs" and e["op"] == "nfs_rpc" and e["pid"] == load.pid
                        and e["path"] == f"{prog} GETATTR")
    assert len(getattrs) >= LOAD_COUNT, getattrs


def _rpc_retrans_counter() -> int:
    """The NFS client's RPC retransmissions (/proc/net/rpc/nfs: rpc <calls> <retrans> <authrefresh>)."""
    for line in Path("/proc/net/rpc/nfs").read_text().splitlines():
        if line.startswith("rpc "):
            return int(line.split()[2])
    raise AssertionError("/proc/net/rpc/nfs has no rpc line")


@pytest.mark.matrix("NFS RPC retransmits", "raw tracepoint")
def test_nfs_rpc_retransmits_under_netem_loss(probe_tracers, nfs_mounts, matrix_unavailable):
    """A 3 s blackout on lo (netem loss 100%) under a read on a mount with timeo=0.5 s,
    retrans=1: the transport times out (TCP_USER_TIMEOUT = 1 s), reconnects after the blackout
    and retransmits. Its own server address (127.0.0.2, also lo) gives it its own transport."""
    t = probe_tracers.nfs_rdma
    t.wait_ready()
    why = kernel_lacks("nfs", t.stderr, NFS_NEEDS)
    if why:
        return matrix_unavailable(why)
    server = Path("/srv/nfs/rtx")
    server.mkdir(exist_ok=True)
    (server / "file").write_bytes(os.urandom(4 * 4096))
    mnt = Path("/mnt/nfs-rtx")
    mnt.mkdir(exist_ok=True)
    run("mount", "-t", "nfs", "-o", "vers=3,timeo=5,retrans=1", "127.0.0.2:/srv/nfs/rtx", str(mnt))
    try:
        # the reader opens the file first (its LOOKUP/ACCESS go through), then reads on "go"
        reader = subprocess.Popen([sys.executable, "-c", (
            "import os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "s = time.time_ns(); os.pread(fd, 4096, 0); print(s, time.time_ns())\n"), str(mnt / "file")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "ready"
        before = _rpc_retrans_counter()
        t0 = time.time_ns()
        run("stallscope-netem", "lo", "loss", "100%")
        reader.stdin.write("go\n")
        reader.stdin.flush()
        time.sleep(3)
        run("stallscope-netem", "lo", "off")
        out, _ = reader.communicate(timeout=120)
        assert reader.returncode == 0, out
        r_start, r_end = map(int, out.split())
        time.sleep(2)           # other RPCs caught by the blackout finish too
        truth = _rpc_retrans_counter() - before
        assert truth >= 1, "no RPC was retransmitted: the blackout did not outlast the transport timeout"
        # every NFS-program RPC that completed since, with its retransmissions
        rpcs = t.wait_events(lambda e: e["type"] == "nfs" and e["op"] == "nfs_rpc" and e["ts_ns"] >= t0 - 1_000_000_000
                             and e["path"].startswith("nfsv") and e["rpc_retrans"] > 0, 1)
        assert sum(e["rpc_retrans"] for e in rpcs) == truth, rpcs
        mine = [e for e in rpcs if e["pid"] == reader.pid]
        assert len(mine) == 1, rpcs
        ev = mine[0]
        assert (ev["path"], ev["server"]) == ("nfsv3 READ", "127.0.0.2"), ev
        assert ev["dur_ns"] >= 3_000_000_000 * 0.8 and ev["ts_ns"] >= r_start - 5_000_000, ev
        assert ev["ts_ns"] + ev["dur_ns"] <= r_end + 5_000_000, ev
        # and the read itself, as the process waited for it
        reads = t.wait_events(lambda e: e["type"] == "nfs" and e["op"] == "nfs_read" and e["pid"] == reader.pid, 1)
        assert len(reads) == 1 and reads[0]["path"] == str(mnt / "file"), reads
        assert reads[0]["dur_ns"] >= ev["dur_ns"], (reads, ev)
    finally:
        subprocess.run(["stallscope-netem", "lo", "off"], capture_output=True)
        subprocess.run(["umount", "-f", str(mnt)], capture_output=True)


@pytest.mark.matrix("NFS blame (simulated GPU, report)", "kprobe")
def test_nfs_read_is_blamed_for_gpu_idle(probe_tracers, nfs_mounts, matrix_unavailable):
    """The demo training loop (sim/trainer.py) on the simulated GPU reads each
    shard from an NFS mount whose every round trip netem delays by 2 x 200 ms; with the
    files' attributes and access cached (nocto, long actimeo) the only RPC a step waits for
    is the READ. Each idle interval is blamed on the dataloader's NFS read of that shard."""
    t = probe_tracers.nfs_rdma
    t.wait_ready()
    why = kernel_lacks("nfs", t.stderr, NFS_NEEDS)
    if why:
        return matrix_unavailable(why)
    assert probe_tracers.gpu, f"the tracer has no simulated GPU: {probe_tracers.gpu_reason}"
    from stallscope.sim.trainer import make_shards

    server = Path("/srv/nfs/blame")
    steps = 3
    make_shards(str(server), steps, slow_every=0)
    mnt = Path("/mnt/nfs-blame")
    mnt.mkdir(exist_ok=True)
    run("mount", "-t", "nfs", "-o", "vers=3,nocto,actimeo=600", "127.0.0.1:/srv/nfs/blame", str(mnt))
    log = Path(str(probe_tracers.recording) + ".trainer.jsonl")
    try:
        for p in sorted(mnt.iterdir()):             # attributes and access rights cached
            os.close(os.open(p, os.O_RDONLY))
        run("stallscope-netem", "lo", "delay", "200ms")
        try:
            env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "STALLSCOPE_NVMLSIM_STATE": str(probe_tracers.sim_state)}
            p = subprocess.run([sys.executable, "-m", "stallscope.sim.trainer", "--state", str(probe_tracers.sim_state),
                                "--gpu", "0", "--data", str(mnt), "--steps", str(steps), "--slow-every", "0",
                                "--log", str(log)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        finally:
            run("stallscope-netem", "lo", "off")
        assert p.returncode == 0, p.stderr
        time.sleep(2.5)          # the last idle interval closes and its batch reaches the recording
        gt = [json.loads(line) for line in log.read_text().splitlines()]
        worker = next(e for e in gt if e["kind"] == "start")["worker_pid"]
        reads = [e for e in gt if e["kind"] == "read"]
        assert len(reads) == steps, gt
        r = subprocess.run([sys.executable, "-m", "stallscope", "report", "--json", str(probe_tracers.recording)],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        verdicts = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        for rd in reads:
            assert rd["end_ns"] - rd["start_ns"] >= 2 * 200_000_000 * 0.9, rd
            vv = [v for v in verdicts if v["gpu"] == 0 and v["idle_start_ns"] < rd["end_ns"]
                  and v["idle_end_ns"] > rd["start_ns"]]
            assert len(vv) == 1, (rd, vv)
            v, c = vv[0], vv[0]["culprit"]
            assert c is not None, v
            assert (c["type"], c["op"], c["path"], c["pid"], c["server"]) == \
                ("nfs", "nfs_read", rd["path"], worker, "127.0.0.1"), v
            assert c["comm"] == "pt_data_worker", c
            assert abs(c["dur_ns"] - (rd["end_ns"] - rd["start_ns"])) < 20_000_000, (c, rd)
            assert v["explained_fraction"] >= 0.7, v
    finally:
        subprocess.run(["stallscope-netem", "lo", "off"], capture_output=True)
        subprocess.run(["umount", "-f", str(mnt)], capture_output=True)

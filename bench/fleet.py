"""Fleet benchmark: a realistic fleet hour written into a Parquet lake, then ``fleet_report`` on Dask.

    python -m bench fleet [--nodes 1024] [--gpus 8] [--hours 1] [--workers 1,2] [--scale-nodes 64]
                          [--lake DIR] [--keep] [--seed 0] [--rate 1] [--batch-ms 250] [--gen-procs 2] [--json]

1. The generator writes, node by node (``--gen-procs`` processes), what the tracers of a busy
   cluster would have shipped in ``--hours``: wire Batches cut every 250 ms (the agent's
   ``batch_ms``), handed to ``wire.lake.write_batches`` once per 10 minutes of a node's batches
   (a collector's lake flush: a node-hour is 6 segments per dataset). Timed on its own, not
   counted. With ``--lake DIR --keep`` the lake stays, and a later run with the same options
   reuses it.
2. ``analysis.fleet.fleet_report`` on a fresh LocalCluster of 1, then 2 worker processes (one
   thread each), timed from the call to the result. Every worker's RSS is sampled from /proc
   every 0.2 s, and its VmHWM (the kernel's own peak) is read at the end.
3. The same at ``--scale-nodes`` nodes (the same per-node load, a smaller fleet): both peaks are
   printed, to show that the peak per worker does not grow with the fleet.

Printed: wall time, events/s (NVML samples + stall rows, per wall second), peak RSS per worker,
speed-up 1 -> 2, verdicts by kind, whether the 1- and 2-worker verdict lists are identical,
and the goals beside them: <= 3 min for a 1,024-node hour on this 2-core machine (smaller
runs also print the linear projection), <= 2 GiB per worker, near-linear speed-up. One JSON
line per figure with ``--json``. Exits 1 when the verdicts differ between worker counts.

The fleet (deterministic for ``--seed``; rates in :data:`RATES`):

- nodes in blocks of 128: about 3 blocks in 8 are one 128-node job, the others a mix of 32-,
  16-, 8-, 4-, 2-node and single-node jobs. A single-node job uses 1-8 GPUs and may end
  mid-hour and be replaced (the new ranks load a checkpoint first, and the GPUs idle meanwhile);
- per GPU one rank process (torchrun under slurmstepd, or in a PyTorchJob pod; job and rank
  from its environment) with 2-8 dataloader workers, re-forked every epoch unless persistent;
  NVML at 6 Hz with microsecond stamps and jitter, ``sample_period_ns`` in every batch's meta
  as the tracer reports it, ``meta.node.addrs``; ``gpu_proc`` rows at each 200 ms poll;
  ``proc`` lineage rows once per process, in the batch that first names it (ancestors too),
  and exit rows for workers and ranks that exit;
- job incidents: one rank stalls and its GPU idles; the other ranks' GPUs keep spinning in
  the collective or, 15% of the time, drop too. The causes are dataset reads, read storms
  (aggregated rows), NFS metadata, TCP loss episodes toward a peer node, page faults on
  mmapped data, D-state waits, CPU contention (runq) and untraced ones, at 15 x
  (ranks/8)^(1/3) per job-hour. Checkpoints come every 10-30 min per job: either every rank
  writes and fsyncs its shard (and half the time waits for the slowest), or rank 0 writes
  while the others wait. Evaluation or logging pauses of a whole job have no traced cause;
- background rows that leave the GPUs busy: dataloader reads over the 10 ms threshold
  (prefetch hides them), small storms, sched rows of rank threads, system daemons' writes
  and fsyncs, TCP retransmits toward storage;
- node clocks off by up to their reported uncertainty (0.2-3 ms).
"""

from __future__ import annotations

import argparse
import calendar
import collections
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stallscope.wire.schema import (  # noqa: E402
    ABI_VERSION,
    HIST_SLOTS,
    SCHEMA_VERSION,
    STALL_TABLES,
    TABLES,
    Batch,
    complete,
)

GENERATOR_VERSION = 1
MS = 1_000_000
S = 1_000_000_000
#: the hour the fleet is generated for (one date partition)
T0 = calendar.timegm((2025, 3, 4, 10, 0, 0)) * S
NVML_PERIOD_NS = S / 6              # H100/H200 utilization sampling
GPU_POLL_NS = 200 * MS              # tracer/agent.py AgentConfig.gpu_poll_ms
BATCH_MS = 250                      # AgentConfig.batch_ms: a batch every 250 ms while data flows
FLUSH_S = 600                       # the collector's lake flush period: one segment per node per flush
BLOCK = 128                         # nodes per layout block
GIB = 1 << 30
GOAL_NODES, GOAL_S, GOAL_RSS_MIB = 1024, 180, 2048     # issue 10: a 1,024-node hour in 3 min, 2 GiB a worker

#: rates (per hour unless said otherwise); ``--rate`` scales every stall and incident rate
RATES = {
    "incidents_per_job_hour": 15.0,     # x (ranks / 8) ** (1/3): bigger jobs straggle more often
    "peers_drop": 0.15,                 # the other ranks' GPUs drop too (else they spin in NCCL)
    "peers_drop_tcp": 0.5,
    "pauses_per_job_hour": 1.0,         # evaluation / logging: every rank idle, nothing traced
    "worker_reads_per_rank_s": 0.5,     # dataloader reads over the threshold, hidden by prefetch
    "storms_per_rank_s": 0.01,
    "sched_per_rank_s": 0.04,           # short runq / D-state spells of rank threads
    "daemon_per_node_s": 0.05,          # rsyslogd, containerd, slurmd writes / fsyncs / stats
    "net_per_node_s": 0.004,            # retransmit episodes toward storage, GPUs busy
}
#: what one rank's incident is, and how often (tcp only in multi-node jobs)
CAUSES = ("read", "storm", "nfs", "tcp", "mmap", "blocked", "runq", "untraced")
CAUSE_P = (0.33, 0.10, 0.08, 0.10, 0.05, 0.05, 0.09, 0.20)
CAUSE_MEDIAN_S = (1.0, 1.5, 2.0, 0.8, 0.8, 1.0, 0.6, 1.0)
DATA_FS = (("lustre", "/lustre/datasets"), ("nfs4", "/mnt/nfs/datasets"), ("fuse", "/mnt/s3"),
           ("wekafs", "/weka/datasets"))
CKPT_FS = (("lustre", "/lustre/ckpt"), ("nfs4", "/mnt/nfs/ckpt"), ("wekafs", "/weka/ckpt"))
DATASETS = ("laion-2b", "fineweb-edu", "imagenet-21k", "the-stack-v2", "redpajama", "coco-2017")
BLOCKED_REASONS = ("jbd2_log_wait_commit", "os_acquire_mutex", "blk_mq_get_tag")
HOGS = ("python3", "kworker/u256:3", "node_exporter", "dcgm-exporter")
DAEMONS = (("rsyslogd", "/var/log/syslog", "ext4"), ("containerd", "/var/lib/containerd/io.containerd.metadata.v1.bolt/meta.db", "ext4"),
           ("slurmd", "/var/spool/slurmd/cred_state", "ext4"), ("dcgm-exporter", "/var/log/dcgm/metrics.log", "ext4"))
ATTACH = {"vfs": "fentry/fexit vfs_read vfs_write",
          "sched": "tp_btf sched_switch sched_wakeup, tracepoints sched_process_fork/exec/exit",
          "tcp": "tp_btf tcp_retransmit_skb", "nfs": "fentry/fexit nfs_file_read nfs_file_write nfs_getattr"}


# ------------------------------------------------------------------------------ layout

@dataclasses.dataclass(frozen=True)
class FleetSpec:
    """What to generate. ``rate`` scales every stall and incident rate (tests use more)."""

    nodes: int = 1024
    gpus: int = 8
    hours: float = 1.0
    seed: int = 0
    rate: float = 1.0
    start_ns: int = T0
    batch_ms: int = BATCH_MS
    flush_s: int = FLUSH_S

    @property
    def end_ns(self) -> int:
        return self.start_ns + int(self.hours * 3600 * S)


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    name: str
    nodes: tuple            # fleet node indexes, in rank order
    gpus: int               # GPUs used per node; rank = position * gpus + local GPU
    start_ns: int           # before the span: running already (no loading phase in it)
    end_ns: int             # after the span: still running
    launcher: str           # "slurm" | "k8s"

    @property
    def ranks(self) -> int:
        return len(self.nodes) * self.gpus


def node_name(i: int) -> str:
    return f"gpu-r{i // 32:03d}-n{i % 32:02d}"


def node_ip(i: int) -> str:
    return f"10.{16 + i // 8192}.{(i // 32) % 256}.{10 + i % 32}"


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@functools.lru_cache(maxsize=4)
def layout(spec: FleetSpec) -> tuple:
    """Every job of the fleet (deterministic for the spec's nodes, gpus, hours and seed)."""
    jobs = []
    for b in range(-(-spec.nodes // BLOCK)):
        rng = _rng(spec.seed, 1, b)
        first = b * BLOCK
        n = min(BLOCK, spec.nodes - first)
        sizes = []
        if n == BLOCK and rng.random() < 3 / 8:
            sizes = [BLOCK]
        else:
            left = n
            choices, p = np.array([32, 16, 8, 4, 2, 1]), np.array([.15, .2, .2, .1, .1, .25])
            while left:
                ok = choices <= left
                sizes.append(int(rng.choice(choices[ok], p=p[ok] / p[ok].sum())))
                left -= sizes[-1]
        at = first
        for k, size in enumerate(sizes):
            jid = 4_810_000 + b * 1000 + 10 * k
            launcher = "k8s" if rng.random() < 0.3 else "slurm"
            began = spec.start_ns - int(rng.uniform(0.5, 48) * 3600 * S)
            far = spec.end_ns + 24 * 3600 * S
            nodes = tuple(range(at, at + size))
            if size > 1:
                jobs.append(Job(jid, _job_name(jid, launcher), nodes, spec.gpus, began, far, launcher))
            else:
                g = int(rng.choice([spec.gpus, max(1, spec.gpus // 2), max(1, spec.gpus // 4), 1],
                                   p=[.7, .15, .1, .05]))
                if rng.random() < 0.3:          # the job ends mid-span and another takes the node
                    t1 = spec.start_ns + int(rng.uniform(0.1, 0.8) * (spec.end_ns - spec.start_ns))
                    t2 = t1 + int(rng.uniform(30, 180) * S)
                    g2 = int(rng.choice([spec.gpus, max(1, spec.gpus // 2)]))
                    jobs.append(Job(jid, _job_name(jid, launcher), nodes, g, began, t1, launcher))
                    jobs.append(Job(jid + 1, _job_name(jid + 1, launcher), nodes, g2, t2, far, launcher))
                else:
                    jobs.append(Job(jid, _job_name(jid, launcher), nodes, g, began, far, launcher))
            at += size
    return tuple(jobs)


def _job_name(jid: int, launcher: str) -> str:
    return str(jid) if launcher == "slurm" else f"ptjob-{jid}"


def jobs_of_node(spec: FleetSpec, i: int) -> list:
    return [j for j in layout(spec) if j.nodes[0] <= i <= j.nodes[-1]]


# ------------------------------------------------------------------------------ job plans

@dataclasses.dataclass
class JobPlan:
    """Job-wide events, the same on every node of the job (drawn from the job's own seed)."""

    ckpt_fs: tuple
    data_fs: tuple
    dataset: str
    workers: int
    epoch_ns: int               # 0: persistent workers
    epoch_phase_ns: int
    util_mean: float
    # incidents: one rank stalls
    inc_t: np.ndarray
    inc_d: np.ndarray
    inc_rank: np.ndarray
    inc_cause: np.ndarray
    inc_drop: np.ndarray        # the other ranks' GPUs drop too
    inc_lag: np.ndarray         # culprit's GPU drains its queue this long first
    inc_peer_lag: np.ndarray    # the others reach the collective this much later
    inc_peer: np.ndarray        # tcp: the rank at the other end of the flow
    # checkpoints
    ckpt_t: np.ndarray
    ckpt_sharded: bool
    ckpt_w: np.ndarray          # (ckpts, ranks) seconds each rank writes (sharded) / (ckpts, 1)
    ckpt_drop: np.ndarray       # the ranks wait for the slowest with their GPUs idle
    ckpt_step0: int
    # evaluation / logging pauses
    pause_t: np.ndarray
    pause_d: np.ndarray
    load_s: np.ndarray          # per rank: loading phase when the job starts in the span


@functools.lru_cache(maxsize=16)
def job_plan(spec: FleetSpec, job: Job) -> JobPlan:
    rng = _rng(spec.seed, 2, job.id)
    lo, hi = max(job.start_ns, spec.start_ns), min(job.end_ns, spec.end_ns)
    hours = max(hi - lo, 0) / (3600 * S)
    R = job.ranks
    lam = RATES["incidents_per_job_hour"] * (R / 8) ** (1 / 3) * spec.rate * hours
    n = int(rng.poisson(lam))
    p = np.array(CAUSE_P)
    if len(job.nodes) == 1:
        p[CAUSES.index("tcp")] = 0
    p /= p.sum()
    cause = rng.choice(len(CAUSES), n, p=p)
    d = np.exp(rng.normal(np.log(np.array(CAUSE_MEDIAN_S)[cause]), 0.8))
    d = np.clip(d, 0.15, 60.0)
    drop_p = np.where(cause == CAUSES.index("tcp"), RATES["peers_drop_tcp"], RATES["peers_drop"])
    rank = rng.integers(0, R, n)
    peer = (rank + job.gpus * rng.integers(1, max(len(job.nodes), 2), n)) % R
    period = rng.uniform(10, 30) * 60 * S
    first = job.start_ns + rng.uniform(0.2, 1.0) * period
    k0 = max(0, math.ceil((lo - first) / period))
    ckpt_t = np.array([first + k * period for k in range(k0, k0 + 1000) if first + k * period < hi], dtype=np.int64)
    sharded = bool(rng.random() < 0.6)
    nck = len(ckpt_t)
    if sharded:         # each rank's shard: a few seconds, a slow tail
        ckpt_w = np.clip(np.exp(rng.normal(np.log(4.0), 0.45, (nck, R))), 0.5, 60.0)
    else:               # rank 0 writes everything
        ckpt_w = np.clip(np.exp(rng.normal(np.log(20.0), 0.4, (nck, 1))), 3.0, 120.0)
    npause = int(rng.poisson(RATES["pauses_per_job_hour"] * spec.rate * hours))
    fs = DATA_FS[int(rng.integers(len(DATA_FS)))]
    return JobPlan(
        ckpt_fs=CKPT_FS[int(rng.integers(len(CKPT_FS)))], data_fs=fs,
        dataset=DATASETS[int(rng.integers(len(DATASETS)))],
        workers=int(rng.choice([2, 4, 6, 8])),
        epoch_ns=0 if rng.random() < 0.6 else int(rng.uniform(8, 25) * 60 * S),
        epoch_phase_ns=int(rng.uniform(0, 25 * 60) * S), util_mean=float(rng.uniform(88, 99)),
        inc_t=np.sort(rng.integers(lo, max(hi, lo + 1), n)), inc_d=(d * S).astype(np.int64),
        inc_rank=rank, inc_cause=cause, inc_drop=rng.random(n) < drop_p,
        inc_lag=(rng.uniform(0.03, 0.25, n) * S).astype(np.int64),
        inc_peer_lag=(rng.uniform(0.05, 0.4, n) * S).astype(np.int64), inc_peer=peer,
        ckpt_t=ckpt_t, ckpt_sharded=sharded, ckpt_w=(ckpt_w * S).astype(np.int64),
        ckpt_drop=rng.random(nck) < 0.5, ckpt_step0=int(rng.integers(1, 400)) * 500,
        pause_t=np.sort(rng.integers(lo, max(hi, lo + 1), npause)),
        pause_d=(rng.uniform(1, 6, npause) * S).astype(np.int64),
        load_s=(rng.uniform(20, 90) * rng.uniform(0.9, 1.0, R) * S).astype(np.int64))


# ------------------------------------------------------------------------------ one node

class _Procs:
    """The node's processes: pid allocation, lineage, identity, exits."""

    COLS = ("pid", "ppid", "comm", "start_ns", "job", "rank", "pod_uid", "container_id")

    def __init__(self, rng):
        self.rng = rng
        self.next_pid = int(rng.integers(20_000, 400_000))
        self.rows = []      # tuples in COLS order, parents before children
        self.exits = {}     # pid -> (exit_ns, wait status)

    def spawn(self, ppid, comm, start_ns, job="", rank=-1, pod="", container="", pid=None) -> int:
        if pid is None:
            pid = self.next_pid
            self.next_pid += int(self.rng.integers(1, 40))
        self.rows.append((pid, ppid, comm, int(start_ns), job, rank, pod, container))
        return pid

    def exit(self, pid, at_ns, status=0) -> None:
        self.exits[pid] = (int(at_ns), int(status))


class _Rows:
    """Stall rows of one node by kind, with the time each reaches the tracer's batch."""

    def __init__(self):
        self.parts = collections.defaultdict(list)

    def add(self, kind, ts, dur, emit, **cols):
        ts = np.atleast_1d(np.asarray(ts, dtype=np.int64))
        n = len(ts)
        if not n:
            return
        out = {"ts_ns": ts, "dur_ns": np.broadcast_to(np.asarray(dur, dtype=np.int64), (n,)),
               "_emit": np.broadcast_to(np.asarray(emit, dtype=np.int64), (n,))}
        for c, k in TABLES[kind].items():
            if c in out:
                continue
            v = cols.get(c, "" if k == "s" else 0)
            if k == "s":
                a = np.empty(n, dtype=object)
                a[:] = v.astype(object) if isinstance(v, np.ndarray) else v
            else:
                a = np.broadcast_to(np.asarray(v, dtype=np.int64), (n,))
            out[c] = a
        self.parts[kind].append(out)

    def tables(self) -> dict:
        out = {}
        for kind, parts in self.parts.items():
            cols = list(TABLES[kind]) + ["_emit"]
            out[kind] = {c: np.concatenate([p[c] for p in parts]) for c in cols}
        return out


def _lognormal_ns(rng, median_s, sigma, n, lo_s, hi_s):
    return (np.clip(np.exp(rng.normal(np.log(median_s), sigma, n)), lo_s, hi_s) * S).astype(np.int64)


def _union(s, e):
    """Merge spans (any order, may overlap) into sorted disjoint ones."""
    keep = e > s
    s, e = s[keep], e[keep]
    if not len(s):
        return s, e
    o = np.argsort(s, kind="stable")
    s, e = s[o], e[o]
    reach = np.maximum.accumulate(e)
    new = np.r_[True, s[1:] > reach[:-1]]
    heads = np.flatnonzero(new)
    return s[heads], np.maximum.reduceat(e, heads)


def _covered_before(t, s, e):
    """Total length of the disjoint sorted spans (s, e) before each time in t."""
    if not len(s):
        return np.zeros(len(t), dtype=np.int64)
    cum = np.r_[0, np.cumsum(e - s)]
    k = np.searchsorted(s, t, side="right") - 1
    kk = np.maximum(k, 0)
    part = np.clip(t - s[kk], 0, e[kk] - s[kk])
    return np.where(k >= 0, cum[kk] + part, 0)


@dataclasses.dataclass
class NodeData:
    """One node's tables (each with an ``_emit`` column: when the row reaches the tracer's
    batch, true time), its meta, and what was planned: ``truth``, one dict per idle span a
    traced stall causes (node, gpu, cause, pid, kinds: the stall types that may be blamed,
    start_ns, end_ns in true time; the node's stamps are off by ``err_ns``)."""

    name: str
    tables: dict
    meta_gpu: dict
    meta_node: dict
    clock: dict
    procs: list             # (pid, ppid, comm, start_ns, job, rank, pod_uid, container_id)
    truth: list
    counts: dict
    seq0: int
    err_ns: int


def node_data(spec: FleetSpec, i: int) -> NodeData:
    """Everything node ``i`` ships over the span (deterministic; independent of other nodes
    except through the job plans they share)."""
    rng = _rng(spec.seed, 4, i)
    lo, hi = spec.start_ns, spec.end_ns
    G = spec.gpus
    name = node_name(i)
    unc = int(rng.uniform(0.2, 3.0) * MS)
    err = int(np.clip(rng.normal(0, unc / 3), -unc, unc))
    procs = _Procs(rng)
    rows = _Rows()
    truth = []
    daemons = []
    pid0 = int(rng.integers(600, 2000))
    for k, (comm, path, fs) in enumerate(DAEMONS):
        daemons.append((procs.spawn(1, comm, lo - int(rng.uniform(1, 30) * 86400 * S), pid=pid0 + 137 * k),
                        comm, path, fs))
    # -- the jobs on this node: processes, owners over time
    owner_s = [[] for _ in range(G)]        # per GPU: spans with an owner
    owner_e = [[] for _ in range(G)]
    owner_pid = [[] for _ in range(G)]
    idle_s = [[] for _ in range(G)]         # per GPU: spans with the GPU idle (true time)
    idle_e = [[] for _ in range(G)]
    util_mean = np.full(G, 95.0)
    for job in jobs_of_node(spec, i):
        plan = job_plan(spec, job)
        pos = job.nodes.index(i)
        jlo, jhi = max(job.start_ns, lo), min(job.end_ns, hi)
        if jhi <= jlo:
            continue
        ident = {"job": job.name}
        pod = container = ""
        if job.launcher == "k8s":
            r2 = _rng(spec.seed, 5, job.id, i)
            pod = "-".join(f"{int(x):0{w}x}" for x, w in zip(r2.integers(0, 1 << 32, 5), (8, 4, 4, 4, 12)))
            container = "".join(f"{int(x):016x}" for x in r2.integers(0, 1 << 62, 4))
            top = procs.spawn(1, "containerd-shim", job.start_ns - 20 * S)
        else:
            top = procs.spawn(1, "slurmstepd", job.start_ns - 20 * S)
        launcher = procs.spawn(top, "torchrun", job.start_ns - 10 * S, pod=pod, container=container, **ident)
        cgroup = int(rng.integers(1 << 12, 1 << 20))
        ranks, workers = {}, {}
        e0, e1 = _epoch_of(plan, job, jlo), _epoch_of(plan, job, jhi - 1)     # epochs in the span
        for g in range(job.gpus):
            r = pos * job.gpus + g
            rpid = procs.spawn(launcher, "python3", job.start_ns - 5 * S, job=job.name, rank=r,
                               pod=pod, container=container)
            ranks[g] = rpid
            workers[g] = _Workers(e0, [])
            for ep in range(e0, e1 + 1):
                workers[g].pids.append([procs.spawn(rpid, "pt_data_worker", _epoch_start(plan, job, ep),
                                                    job=job.name, rank=r, pod=pod, container=container)
                                        for _ in range(plan.workers)])
                if ep > e0:                     # the previous epoch's workers exit
                    for w in workers[g].pids[-2]:
                        procs.exit(w, _epoch_start(plan, job, ep) - int(rng.uniform(0.1, 0.5) * S))
            if job.end_ns < hi:                 # the job finishes: everything exits cleanly
                for w in [rpid, *workers[g].pids[-1]]:
                    procs.exit(w, job.end_ns - int(rng.uniform(0.1, 1.0) * S))
            owner_s[g].append(jlo)
            owner_e[g].append(jhi)
            owner_pid[g].append(rpid)
            util_mean[g] = plan.util_mean
        if job.end_ns < hi:
            procs.exit(launcher, job.end_ns)
        _job_rows(spec, job, plan, pos, i, rng, rows, truth, ranks, workers, cgroup, jlo, jhi,
                  idle_s, idle_e)
    # unowned stretches of each GPU are idle
    for g in range(G):
        s_own, e_own = _union(np.array(owner_s[g], dtype=np.int64), np.array(owner_e[g], dtype=np.int64))
        edges = np.r_[lo, e_own], np.r_[s_own, hi]
        for a, b in zip(*edges):
            if b > a:
                idle_s[g].append(np.array([a]))
                idle_e[g].append(np.array([b]))
    _background_rows(spec, i, rng, rows, daemons)

    # -- NVML samples: 6 Hz per GPU, util from the idle share of each sample's period
    n_per = int((hi - lo) / NVML_PERIOD_NS)
    k = np.arange(1, n_per + 1)
    synth_driver = rng.random() < 1 / 16
    g_ts, g_gpu, g_util, g_synth, g_emit = [], [], [], [], []
    poll_phase = int(rng.integers(0, GPU_POLL_NS))
    periods = {}
    for g in range(G):
        phase = rng.uniform(0, NVML_PERIOD_NS)
        ts = lo + phase + k * NVML_PERIOD_NS + rng.uniform(-200e3, 200e3, n_per)
        ts = (ts // 1000 * 1000).astype(np.int64)           # NVML stamps are microseconds
        ts = ts[ts < hi]
        periods[g] = int(np.median(np.diff(ts[:65])))       # the tracer: median of recent deltas
        s_idle, e_idle = _union(np.concatenate(idle_s[g]) if idle_s[g] else np.empty(0, np.int64),
                                np.concatenate(idle_e[g]) if idle_e[g] else np.empty(0, np.int64))
        s_idle, e_idle = np.clip(s_idle, lo, hi), np.clip(e_idle, lo, hi)
        per = int(NVML_PERIOD_NS)
        frac = (_covered_before(ts, s_idle, e_idle) - _covered_before(ts - per, s_idle, e_idle)) / per
        busy_u = np.clip(rng.normal(util_mean[g], 3.0, len(ts)), 60, 100)
        util = np.rint(busy_u * (1 - frac)).astype(np.int64)
        synth = np.zeros(len(ts), dtype=np.int64)
        if synth_driver and len(ts):
            # this driver's ring stays empty while the GPU idles: the tracer fills in util 0 at
            # the observed period while processes hold the GPU, and has nothing to say otherwise
            full = frac >= 0.999
            run = np.cumsum(~full)
            first = np.r_[0, np.flatnonzero(np.diff(run) != 0) + 1]
            pos_in = np.arange(len(ts)) - np.repeat(first, np.diff(np.r_[first, len(ts)]))
            quiet = full & (pos_in >= 6)
            s_own, e_own = _union(np.array(owner_s[g], dtype=np.int64), np.array(owner_e[g], dtype=np.int64))
            owned = _covered_before(ts, s_own, e_own) > _covered_before(ts - 1, s_own, e_own)
            keep = ~quiet | owned
            ts, frac, util, synth = ts[keep], frac[keep], util[keep], quiet[keep].astype(np.int64)
        emit = lo + poll_phase + ((ts - lo - poll_phase) // GPU_POLL_NS + 1) * GPU_POLL_NS
        g_ts.append(ts)
        g_gpu.append(np.full(len(ts), g, dtype=np.int64))
        g_util.append(util)
        g_synth.append(synth)
        g_emit.append(emit)
    gpu = {"ts_ns": np.concatenate(g_ts), "gpu": np.concatenate(g_gpu), "util": np.concatenate(g_util),
           "synth": np.concatenate(g_synth), "_emit": np.concatenate(g_emit)}
    o = np.lexsort((gpu["ts_ns"], gpu["gpu"], gpu["_emit"]))
    gpu = {c: v[o] for c, v in gpu.items()}

    # -- NVML process lists at every poll
    polls = lo + poll_phase + np.arange(0, (hi - lo - poll_phase) // GPU_POLL_NS + 1) * GPU_POLL_NS
    polls = polls[polls < hi]
    p_ts, p_gpu, p_pid = [], [], []
    for g in range(G):
        for a, b, pid in zip(owner_s[g], owner_e[g], owner_pid[g]):
            m = polls[(polls >= a) & (polls < b)]
            p_ts.append(m)
            p_gpu.append(np.full(len(m), g, dtype=np.int64))
            p_pid.append(np.full(len(m), pid, dtype=np.int64))
    gp = {"ts_ns": np.concatenate(p_ts) if p_ts else np.empty(0, np.int64),
          "gpu": np.concatenate(p_gpu) if p_gpu else np.empty(0, np.int64),
          "pid": np.concatenate(p_pid) if p_pid else np.empty(0, np.int64)}
    gp["_emit"] = gp["ts_ns"] + 2 * MS
    o = np.lexsort((gp["gpu"], gp["ts_ns"]))
    gp = {c: v[o] for c, v in gp.items()}

    tables = rows.tables()
    for kind, t in tables.items():
        o = np.argsort(t["_emit"], kind="stable")
        tables[kind] = {c: v[o] for c, v in t.items()}
    tables["gpu"] = gpu
    tables["gpu_proc"] = gp
    last = int(flush_times(spec, i)[-1])     # what reaches the span's last batch is shipped
    for kind, t in tables.items():
        keep = t["_emit"] <= last
        tables[kind] = {c: v[keep] for c, v in t.items()}
    tables["proc"] = _proc_table(procs, tables, last)
    # this node's clock is off by err: every stamp it makes
    for t in tables.values():
        for c in ("ts_ns", "start_ns", "exit_ns"):
            if c in t:
                t[c] = np.where(t[c] > 0, t[c] + err, 0)
    tables = {k: _conform(k, t, len(t["_emit"])) for k, t in tables.items()}
    gpus = [{"index": g, "uuid": f"GPU-{int(x):08x}-{i:04x}-{g:04x}-0000-{spec.seed & 0xFFFF:012x}",
             "name": "NVIDIA H100 80GB HBM3"} for g, x in zip(range(G), rng.integers(0, 1 << 32, G))]
    meta_node = {"addrs": [node_ip(i)]}
    meta_gpu = {"gpus": gpus, "sample_period_ns": periods, "errors": 0, "source": "samples",
                "driver": "550.90.07" if not synth_driver else "535.104.05"}
    maxerr = unc - int(rng.integers(5_000, 60_000))
    clock = {"wall_minus_mono_ns": int(lo - rng.integers(1, 40) * 86400 * S) + err, "ntp_synced": True,
             "ntp_maxerror_ns": maxerr, "uncertainty_ns": unc, "steps": 0, "last_step_ns": 0}
    counts = {"samples": len(tables["gpu"]["ts_ns"]), "gpu_proc": len(tables["gpu_proc"]["ts_ns"]), "proc": len(tables["proc"]["pid"]),
              **{k: len(t["ts_ns"]) for k, t in tables.items() if k in STALL_TABLES}}
    counts["stall_rows"] = sum(counts.get(k, 0) for k in STALL_TABLES)
    return NodeData(name, tables, meta_gpu, meta_node, clock, procs.rows, truth, counts,
                    seq0=int(rng.integers(100_000, 5_000_000)), err_ns=err)


@dataclasses.dataclass
class _Workers:
    """One rank's dataloader workers: ``pids[k]`` those of epoch ``first + k``."""

    first: int
    pids: list


def _epoch_of(plan: JobPlan, job: Job, t):
    """The epoch a time falls in (0 before the first re-fork; always 0 with persistent workers)."""
    if not plan.epoch_ns:
        return np.zeros_like(t) if isinstance(t, np.ndarray) else 0
    e = (t - job.start_ns - plan.epoch_phase_ns) // plan.epoch_ns + 1
    return np.maximum(e, 0) if isinstance(t, np.ndarray) else max(int(e), 0)


def _epoch_start(plan: JobPlan, job: Job, ep: int) -> int:
    return job.start_ns if ep == 0 else job.start_ns + plan.epoch_phase_ns + (ep - 1) * plan.epoch_ns


def _worker_at(plan: JobPlan, job: Job, workers: _Workers, t: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The dataloader worker pid (index ``pick``) alive at each time t."""
    table = np.array(workers.pids, dtype=np.int64)
    k = np.clip(_epoch_of(plan, job, np.asarray(t, dtype=np.int64)) - workers.first, 0, len(table) - 1)
    return table[k, pick % table.shape[1]]


def _job_rows(spec, job, plan, pos, i, rng, rows, truth, ranks, workers, cgroup, jlo, jhi, idle_s, idle_e):
    """Stall rows of this node's ranks of ``job`` and the idle spans of its GPUs."""
    name = node_name(i)
    data_fs, data_root = plan.data_fs
    ck_fs, ck_root = plan.ckpt_fs
    shards = np.array([f"{data_root}/{plan.dataset}/shard-{n:06d}.tar" for n in range(512)], dtype=object)
    dev_data, dev_ck = 40 + DATA_FS.index(plan.data_fs), 50 + CKPT_FS.index(plan.ckpt_fs)
    io_common = {"cgroup": cgroup, "method": "fentry", "count": 1}
    R0 = pos * job.gpus
    local = {g: R0 + g for g in ranks}
    ip = node_ip(i)

    def emit(end, kind="io"):
        lag = {"io": (5, 40), "sched": (200, 240), "net": (1000, 1250), "nfs": (5, 40)}[kind]
        return end + (rng.uniform(*lag, np.size(end)) * MS).astype(np.int64)

    def mark(g, s, e, cause, kind=None, pid=0):
        idle_s[g].append(np.atleast_1d(np.asarray(s, dtype=np.int64)))
        idle_e[g].append(np.atleast_1d(np.asarray(e, dtype=np.int64)))
        if cause is not None:
            for a, b in zip(np.atleast_1d(s), np.atleast_1d(e)):
                truth.append({"node": name, "gpu": g, "cause": cause, "pid": int(pid), "start_ns": int(a),
                              "end_ns": int(b), "kinds": ("nfs", "io") if kind == "nfs" else (kind,)})

    tail = (lambda n: (rng.uniform(0.02, 0.1, n) * S).astype(np.int64))
    for g, r in local.items():
        rpid = ranks[g]
        # -- incidents of the job: this rank's own, and the others' where the GPUs drop too
        own = plan.inc_rank == r
        t, d = plan.inc_t, plan.inc_d
        for x in np.flatnonzero(own):
            cause = CAUSES[int(plan.inc_cause[x])]
            s, dur = int(t[x]), int(d[x])
            kind, pid = _incident_rows(rows, rng, cause, s, dur, rpid, plan, job, workers[g], shards,
                                       dev_data, data_fs, io_common, ip, plan.inc_peer[x], emit)
            e = s + dur + int(tail(1)[0])
            if e - (s + int(plan.inc_lag[x])) > 0:
                mark(g, s + int(plan.inc_lag[x]), e, None if cause == "untraced" else cause, kind, pid)
        peers = (~own) & plan.inc_drop
        ps = t[peers] + plan.inc_peer_lag[peers] + (rng.uniform(-20, 20, peers.sum()) * MS).astype(np.int64)
        pe = t[peers] + d[peers] + tail(int(peers.sum()))
        mark(g, ps, pe, None)
        # -- checkpoints
        for c, tc in enumerate(plan.ckpt_t):
            tc = int(tc)
            step = plan.ckpt_step0 + 500 * c
            writer = plan.ckpt_sharded or r == 0
            w = int(plan.ckpt_w[c, r if plan.ckpt_sharded else 0])
            lag = int(rng.uniform(0.03, 0.2) * S)
            if writer:
                path = f"{ck_root}/{job.name}/step_{step:07d}/__{r}_0.distcp"
                fs_d = int(w * rng.uniform(0.1, 0.3))
                m = int(rng.integers(4, 24))
                cuts = np.sort(rng.uniform(0, 1, m - 1))
                edges = (tc + np.r_[0, cuts, 1] * (w - fs_d)).astype(np.int64)
                ws, we = edges[:-1], edges[1:] - (rng.uniform(0, 2, m) * MS).astype(np.int64)
                tid, ino = rpid + 3, int(rng.integers(1 << 20, 1 << 40))    # the checkpoint thread
                rows.add("io", ws, we - ws, emit(we), pid=rpid, tid=tid, comm="python3",
                         op=np.where(rng.random(m) < 0.5, "pwrite", "write"), bytes=64 << 20, path=path,
                         fs=ck_fs, dev=dev_ck, ino=ino, **io_common)
                fs_s = int(edges[-1])
                rows.add("io", fs_s, fs_d, emit(np.array([fs_s + fs_d])), pid=rpid, tid=tid,
                         comm="python3", op="fsync", bytes=0, path=path, fs=ck_fs, dev=dev_ck,
                         ino=ino, **io_common)
                mark(g, tc + lag, tc + w + int(tail(1)[0]), "checkpoint", "io", rpid)
                if plan.ckpt_sharded and plan.ckpt_drop[c]:     # then waits for the slowest shard
                    mark(g, tc + w, tc + int(plan.ckpt_w[c].max()) + int(tail(1)[0]), None)
            elif plan.ckpt_drop[c]:
                mark(g, tc + lag + int(rng.uniform(0.05, 0.3) * S), tc + w + int(tail(1)[0]), None)
        # -- evaluation / logging pauses: every rank idle, nothing traced
        if len(plan.pause_t):
            j = (rng.uniform(0, 80, len(plan.pause_t)) * MS).astype(np.int64)
            mark(g, plan.pause_t + j, plan.pause_t + plan.pause_d + j, None)
        # -- the job starts inside the span: ranks load a checkpoint, GPUs idle meanwhile
        if job.start_ns >= spec.start_ns:
            ld = int(plan.load_s[r])
            m = max(2, ld // (400 * MS))
            edges = (job.start_ns + np.linspace(0, ld, m + 1)).astype(np.int64)
            path = f"{ck_root}/{job.name}/latest/__{r}_0.distcp"
            rows.add("io", edges[:-1], np.diff(edges) - MS, emit(edges[1:]), pid=rpid, tid=rpid,
                     comm="python3", op="read", bytes=256 << 20, path=path, fs=ck_fs, dev=dev_ck,
                     ino=int(rng.integers(1 << 20, 1 << 40)), **io_common)
            mark(g, job.start_ns, job.start_ns + ld + int(tail(1)[0]), "load", "io", rpid)
        # -- background: reads the prefetch hides, small storms, short sched spells
        span_h = (jhi - jlo) / S
        n = int(rng.poisson(RATES["worker_reads_per_rank_s"] * spec.rate * span_h))
        ts = np.sort(rng.integers(jlo, jhi, n))
        dur = _lognormal_ns(rng, 0.02, 0.7, n, 0.01, 1.5)
        wp = _worker_at(plan, job, workers[g], ts, rng.integers(0, plan.workers, n))
        sh = rng.integers(0, len(shards), n)
        rows.add("io", ts, dur, emit(ts + dur), pid=wp, tid=wp, comm="pt_data_worker",
                 op=np.where(rng.random(n) < 0.7, "read", "pread"), bytes=rng.integers(1, 9, n) << 20,
                 path=shards[sh], fs=data_fs, dev=dev_data, ino=(1 << 30) + sh, **io_common)
        n = int(rng.poisson(RATES["storms_per_rank_s"] * spec.rate * span_h))
        ts = np.sort(rng.integers(jlo, jhi, n))
        dur = _lognormal_ns(rng, 0.06, 0.6, n, 0.015, 0.5)
        cnt = rng.integers(20, 200, n)
        wp = _worker_at(plan, job, workers[g], ts, rng.integers(0, plan.workers, n))
        sh = rng.integers(0, len(shards), n)
        rows.add("io", ts, dur, emit(ts + dur), pid=wp, tid=wp, comm="pt_data_worker", op="read",
                 bytes=cnt * 4096, path=shards[sh], fs=data_fs, dev=dev_data, ino=(1 << 30) + sh,
                 cgroup=cgroup, method="fentry", count=cnt,
                 blocked_ns=(dur * rng.uniform(0.6, 0.9, n)).astype(np.int64))
        n = int(rng.poisson(RATES["sched_per_rank_s"] * spec.rate * span_h))
        ts = np.sort(rng.integers(jlo, jhi, n))
        dur = _lognormal_ns(rng, 0.03, 0.6, n, 0.01, 0.15)
        runq = rng.random(n) < 0.7
        hog = rng.integers(0, len(HOGS), n)
        rows.add("sched", ts, dur, emit(ts + dur, "sched"), pid=rpid, tid=rpid + rng.integers(0, 3, n),
                 comm="python3", op=np.where(runq, "runq", "blocked"),
                 reason=np.where(runq, "preempted", np.array(BLOCKED_REASONS, dtype=object)[hog % 3]),
                 count=rng.integers(1, 6, n), blocked_ns=dur, other_pid=np.where(runq, 4000 + hog, 0),
                 other_comm=np.where(runq, np.array(HOGS, dtype=object)[hog], ""))


def _incident_rows(rows, rng, cause, s, dur, rpid, plan, job, workers, shards, dev_data, data_fs,
                   io_common, ip, peer_rank, emit):
    """The rows one incident leaves (none for "untraced"); returns (stall type, pid) of the
    row that should be blamed."""
    e = s + dur
    if cause == "read":
        wp = int(_worker_at(plan, job, workers, np.array([s]), rng.integers(0, plan.workers, 1))[0])
        m = int(rng.integers(1, 4))
        edges = (s + np.linspace(0, dur, m + 1)).astype(np.int64)
        sh = int(rng.integers(len(shards)))
        rows.add("io", edges[:-1], np.diff(edges) - (rng.uniform(0, 2, m) * MS).astype(np.int64),
                 emit(edges[1:]), pid=wp, tid=wp, comm="pt_data_worker", op="read", bytes=8 << 20,
                 path=shards[sh], fs=data_fs, dev=dev_data, ino=(1 << 30) + sh, **io_common)
        return "io", wp
    if cause == "storm":
        wp = int(_worker_at(plan, job, workers, np.array([s]), rng.integers(0, plan.workers, 1))[0])
        cnt = int(rng.integers(200, 4000))
        sh = int(rng.integers(len(shards)))
        rows.add("io", s, dur, emit(np.array([e])), pid=wp, tid=wp, comm="pt_data_worker", op="read",
                 bytes=cnt * 4096, path=shards[sh], fs=data_fs, dev=dev_data, ino=(1 << 30) + sh,
                 cgroup=io_common["cgroup"], method="fentry", count=cnt,
                 blocked_ns=int(dur * rng.uniform(0.7, 0.95)))
        return "io", wp
    if cause == "nfs":
        path = f"/home/u{int(rng.integers(1000, 1999))}/.cache/torch/kernels/{int(rng.integers(1 << 30)):08x}.bin"
        op = str(rng.choice(["nfs_getattr", "nfs_open", "nfs_read"]))
        rows.add("nfs", s, dur, emit(np.array([e]), "nfs"), pid=rpid, tid=rpid, comm="python3", op=op,
                 bytes=0 if op != "nfs_read" else 1 << 16, path=path, fs="nfs4", server="nfs-home-01",
                 xid=int(rng.integers(1 << 31)), rpc_retrans=int(rng.integers(0, 3)), method="fentry")
        rows.add("io", s, dur, emit(np.array([e])), pid=rpid, tid=rpid, comm="python3",
                 op="stat" if op == "nfs_getattr" else ("openat" if op == "nfs_open" else "read"),
                 bytes=0, path=path, fs="nfs4", dev=30, ino=int(rng.integers(1 << 20, 1 << 40)), **io_common)
        rows.add("sched", s, dur, emit(np.array([e]), "sched"), pid=rpid, tid=rpid, comm="python3",
                 op="blocked", reason="rpc_wait_bit_killable", count=1, blocked_ns=dur)
        return "nfs", rpid
    if cause == "tcp":
        peer_node = job.nodes[int(peer_rank) // job.gpus]
        rto = 200 * MS
        rows.add("net", s, dur, emit(np.array([e]), "net"), pid=rpid, tid=0, comm="python3",
                 op="retransmit", saddr=ip, sport=int(rng.integers(32768, 60999)), daddr=node_ip(peer_node),
                 dport=int(rng.integers(40000, 60000)), state="ESTABLISHED",
                 retransmits=max(1, int(math.log2(1 + dur / rto))) + int(rng.integers(0, 3)),
                 sock_ino=int(rng.integers(1 << 20, 1 << 32)))
        return "net", rpid
    if cause == "mmap":
        sh = int(rng.integers(len(shards)))
        rows.add("io", s, dur, emit(np.array([e])), pid=rpid, tid=rpid, comm="python3", op="page_fault",
                 bytes=0, path=shards[sh], fs=data_fs, dev=dev_data, ino=(1 << 30) + sh,
                 cgroup=io_common["cgroup"], method="fentry", count=int(rng.integers(5, 200)),
                 blocked_ns=int(dur * 0.9))
        rows.add("sched", s, dur, emit(np.array([e]), "sched"), pid=rpid, tid=rpid, comm="python3",
                 op="blocked", reason="filemap_fault", count=1, blocked_ns=dur)
        return "io", rpid
    if cause == "blocked":
        rows.add("sched", s, dur, emit(np.array([e]), "sched"), pid=rpid, tid=rpid, comm="python3",
                 op="blocked", reason=str(rng.choice(BLOCKED_REASONS)), count=1, blocked_ns=dur)
        return "sched", rpid
    if cause == "runq":
        h = int(rng.integers(len(HOGS)))
        rows.add("sched", s, dur, emit(np.array([e]), "sched"), pid=rpid, tid=rpid, comm="python3",
                 op="runq", reason="preempted", count=int(rng.integers(1, 20)),
                 blocked_ns=int(dur * rng.uniform(0.6, 0.95)), other_pid=4000 + h, other_comm=HOGS[h])
        return "sched", rpid
    return None, 0


def _background_rows(spec, i, rng, rows, daemons):
    lo, hi = spec.start_ns, spec.end_ns
    span_s = (hi - lo) / S
    n = int(rng.poisson(RATES["daemon_per_node_s"] * spec.rate * span_s))
    ts = np.sort(rng.integers(lo, hi, n))
    dur = _lognormal_ns(rng, 0.03, 0.8, n, 0.01, 0.5)
    who = rng.integers(0, len(daemons), n)
    pid = np.array([d[0] for d in daemons], dtype=np.int64)[who]
    comm = np.array([d[1] for d in daemons], dtype=object)[who]
    path = np.array([d[2] for d in daemons], dtype=object)[who]
    op = np.where(rng.random(n) < 0.7, "write", "fsync")
    rows.add("io", ts, dur, ts + dur + 20 * MS, pid=pid, tid=pid, comm=comm, op=op, bytes=4096, path=path,
             fs="ext4", dev=259, ino=1000 + who, cgroup=1, method="fentry", count=1)
    n = int(rng.poisson(RATES["net_per_node_s"] * spec.rate * span_s))
    ts = np.sort(rng.integers(lo, hi, n))
    dur = _lognormal_ns(rng, 0.4, 0.5, n, 0.2, 3.0)
    rows.add("net", ts, dur, ts + dur + S, pid=0, tid=0, comm="", op="retransmit", saddr=node_ip(i),
             sport=rng.integers(32768, 60999, n), daddr="10.200.0.21", dport=443, state="ESTABLISHED",
             retransmits=rng.integers(1, 4, n), sock_ino=rng.integers(1 << 20, 1 << 32, n))


def _proc_table(procs: _Procs, tables: dict, end_ns: int) -> dict:
    """Lineage rows, each in the batch that first names the process or one of its descendants
    (tracer/procinfo.py ProcCache.table_for: a pid and its ancestors, once), and a second row
    with ``exit_ns``/``exit_status`` for each process that exits in the span (those with a job
    or rank: the tracer reports the exits that matter)."""
    first = {}
    for kind in STALL_TABLES + ("gpu_proc",):
        t = tables.get(kind)
        if t is None or not len(t["pid"]):
            continue
        pid = np.asarray(t["pid"], dtype=np.int64)
        o = np.lexsort((t["_emit"], pid))
        head = np.r_[True, pid[o][1:] != pid[o][:-1]]
        for p, e in zip(pid[o][head].tolist(), t["_emit"][o][head].tolist()):
            if p > 0 and e < first.get(p, 1 << 62):
                first[p] = e
    parent = {r[0]: r[1] for r in procs.rows}
    for row in reversed(procs.rows):            # children after parents: carry times upward
        p = row[0]
        if p in first and parent.get(p, 0) in parent:
            pp = parent[p]
            first[pp] = min(first.get(pp, 1 << 62), first[p])
    sent = [(first[r[0]], r, 0, -1) for r in procs.rows if r[0] in first]
    for r in procs.rows:
        ex = procs.exits.get(r[0])
        if ex is not None and r[0] in first and (r[4] or r[5] >= 0):
            at = max(ex[0] + 15 * MS, first[r[0]] + 1)          # after the lineage row
            if at < end_ns:
                sent.append((at, r, ex[0], ex[1]))
    sent.sort(key=lambda x: x[0])
    spec = TABLES["proc"]
    out = {}
    for k, c in enumerate(_Procs.COLS):
        out[c] = np.array([r[k] for _e, r, _x, _s in sent], dtype=object if spec[c] == "s" else np.int64)
    if "exit_ns" in spec:
        out["exit_ns"] = np.array([x for _e, _r, x, _s in sent], dtype=np.int64)
        out["exit_status"] = np.array([st for _e, _r, _x, st in sent], dtype=np.int64)
    out["_emit"] = np.array([e for e, _r, _x, _s in sent], dtype=np.int64)
    return out


def _conform(kind: str, t: dict, n: int) -> dict:
    """Every column of the schema's table (a column this generator does not know: the schema's
    fill, else 0 / ""), in the dtypes wire.codec.decode gives."""
    t = complete(kind, t)
    out = {}
    for c, k in TABLES[kind].items():
        v = t.get(c)
        if v is None:
            v = np.full(n, "", dtype=object) if k == "s" else np.zeros(n, dtype=np.int64)
        out[c] = (np.asarray(v, dtype=object) if k == "s" else
                  np.asarray(v).astype(np.uint64 if k == "u" else np.int64))
    if "_emit" in t:
        out["_emit"] = t["_emit"]
    return out


# ------------------------------------------------------------------------------ batches

def flush_times(spec: FleetSpec, i: int) -> np.ndarray:
    """When node ``i``'s agent cuts its batches (true time): every ``batch_ms``, from a phase."""
    bns = spec.batch_ms * MS
    phase = int(_rng(spec.seed, 6, i).integers(0, bns))
    return spec.start_ns + phase + np.arange(0, (spec.end_ns - spec.start_ns - phase) // bns + 1,
                                             dtype=np.int64) * bns


def node_segments(spec: FleetSpec, i: int, data: NodeData | None = None):
    """Node ``i``'s batches, one list per lake flush (``spec.flush_s``): what the collector hands
    to ``write_batches`` each time. Batches are cut every ``spec.batch_ms`` like the agent's."""
    d = data or node_data(spec, i)
    lo = spec.start_ns
    flush = flush_times(spec, i)
    nb = len(flush)
    bounds = {k: np.searchsorted(t["_emit"], flush, side="right") for k, t in d.tables.items()}
    for k, t in d.tables.items():
        if len(t["_emit"]) and np.any(np.diff(t["_emit"]) < 0):
            raise AssertionError(f"{d.name}: {k} rows not in emission order")
    cols = {k: [c for c in TABLES[k]] for k in d.tables}
    # cumulative counters, as the agent sends them
    cum = {k: np.asarray(b) for k, b in bounds.items()}
    base = int(_rng(spec.seed, 7, i).integers(10_000, 10_000_000))
    hist_every = 8
    seg_of = (flush - lo) // (spec.flush_s * S)
    static = {"abi": ABI_VERSION, "schema": SCHEMA_VERSION, "min_latency_ns": 10 * MS,
              "attach": dict(ATTACH), "not_loaded": {}, "final": False, "node": d.meta_node,
              "gpu": d.meta_gpu}
    seg, out, hist = 0, [], {}
    prev = {k: 0 for k in d.tables}
    for b in range(nb):
        tables = {}
        for k, t in d.tables.items():
            a, z = prev[k], int(bounds[k][b])
            if z > a:
                tables[k] = {c: t[c][a:z] for c in cols[k]}
            prev[k] = z
        if b % hist_every == 0:
            hist = _hist(base, int(cum.get("io", np.zeros(nb, np.int64))[b]), b)
        sent = int(flush[b]) + d.err_ns + 300_000       # this node's clock; encoding took a moment
        counters = {"vfs.emitted": base + int(cum["io"][b]) if "io" in cum else base,
                    "vfs.below_threshold": base * 40 + b * 1800, "vfs.lost_ringbuf": 0,
                    "sched.emitted": int(cum["sched"][b]) if "sched" in cum else 0,
                    "nfs.emitted": int(cum["nfs"][b]) if "nfs" in cum else 0,
                    "tcp.retransmits": int(cum["net"][b]) if "net" in cum else 0,
                    "tick_errors": 0, "clock.steps": 0, "proc.cached": 420 + b % 50}
        meta = dict(static)
        meta["clock"] = dict(d.clock, sent_ns=sent)
        if seg_of[b] != seg:
            if out:
                yield out
            seg, out = int(seg_of[b]), []
        out.append(Batch(d.name, d.seq0 + b, tables, counters, hist, meta))
    if out:
        yield out


def _hist(base: int, n_io: int, b: int) -> dict:
    """Latency histograms (log2 ns slots, cumulative) as the agent caches them every 8 batches."""
    slots = np.arange(HIST_SLOTS)
    shape = np.exp(-0.5 * ((slots - 18) / 2.5) ** 2)          # most ops near 2^18 ns (~0.26 ms)
    read = np.rint(shape * (base + b * 1500) / shape.sum()).astype(np.int64)
    write = np.rint(shape * (base // 8 + b * 200) / shape.sum()).astype(np.int64)
    read[23:] += n_io // max(HIST_SLOTS - 23, 1)
    return {"vfs": {"read": read.tolist(), "write": write.tolist()}}


def node_batches(spec: FleetSpec, i: int) -> list:
    """All of node ``i``'s batches over the span, in order."""
    return [b for seg in node_segments(spec, i) for b in seg]


def fleet_batches(spec: FleetSpec):
    """Every node's batches, node by node (memory: one node at a time)."""
    for i in range(spec.nodes):
        yield from node_batches(spec, i)


# ------------------------------------------------------------------------------ the lake

def _lake_api():
    try:
        from stallscope.wire.lake import write_batches
    except ImportError as e:
        raise SystemExit(f"bench fleet: the Parquet lake writer is missing (stallscope.wire.lake: {e}); "
                         "install the fleet extra: pip install -e '.[fleet]'") from e
    return write_batches


def _write_node(args):
    spec, i, url = args
    write_batches = _lake_api()
    d = node_data(spec, i)
    files, batches = 0, 0
    for seg in node_segments(spec, i, d):
        files += len(write_batches(url, d.name, seg))
        batches += len(seg)
    return dict(d.counts, node=i, batches=batches, files=files)


def write_lake(spec: FleetSpec, url: str, procs: int = 2, log=None) -> dict:
    """Generate the fleet into the lake at ``url``, ``procs`` nodes at a time; returns totals."""
    tot = collections.Counter()
    t0 = time.perf_counter()
    work = [(spec, i, url) for i in range(spec.nodes)]
    if procs > 1:
        ctx = multiprocessing.get_context("spawn")    # the report's Dask threads may be running: no fork
        with ctx.Pool(procs) as pool:
            done = pool.imap_unordered(_write_node, work, chunksize=4)
            for k, c in enumerate(done, 1):
                c.pop("node")
                tot.update(c)
                if log and (k % 64 == 0 or k == spec.nodes):
                    log(f"generated {k}/{spec.nodes} nodes ({time.perf_counter() - t0:.0f} s)")
    else:
        for k, w in enumerate(work, 1):
            c = _write_node(w)
            c.pop("node")
            tot.update(c)
            if log and (k % 64 == 0 or k == spec.nodes):
                log(f"generated {k}/{spec.nodes} nodes ({time.perf_counter() - t0:.0f} s)")
    out = dict(tot)
    out["events"] = out.get("samples", 0) + out.get("stall_rows", 0)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------ measuring

def _rss_kib(pid: int) -> tuple:
    """(VmRSS, VmHWM) of a process in KiB, from /proc."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")       # minus idle and iowait


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples the RSS of the given pids every ``every_s`` until stopped; keeps each one's peak."""

    def __init__(self, pids, every_s=0.2):
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.every_s = every_s
        self.peak = {p: 0 for p in self.pids}
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            for p in self.pids:
                try:
                    self.peak[p] = max(self.peak[p], _rss_kib(p)[0])
                except OSError:
                    pass
            self.samples += 1
            self._halt.wait(self.every_s)

    def stop(self):
        self._halt.set()
        self.join()


def _verdict_key(v) -> str:
    """A digest of the whole verdict (every field of its JSON form): lists of these compare."""
    return hashlib.blake2b(json.dumps(v.to_json(), sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def run_report(url: str, workers: int, log=None) -> dict:
    """``fleet_report`` on a fresh LocalCluster of ``workers`` processes (1 thread each):
    wall time, worker CPU, per-worker peak RSS (sampled, and the kernel's VmHWM)."""
    try:
        from dask.distributed import Client, LocalCluster

        from stallscope.analysis.fleet import fleet_report
    except ImportError as e:
        raise SystemExit(f"bench fleet: needs dask.distributed and stallscope.analysis.fleet ({e}); "
                         "pip install -e '.[fleet]'") from e
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                      dashboard_address=":0", silence_logs=40) as cluster, Client(cluster) as client:
        pids = sorted(client.run(os.getpid).values())
        base = {p: _rss_kib(p)[0] for p in pids}
        cpu0 = {p: _cpu_s(p) for p in pids}
        me = os.getpid()
        me_base = _rss_kib(me)[0]
        sampler = RssSampler(pids + [me])
        sampler.start()
        t0, c0, m0 = time.perf_counter(), time.process_time(), _machine_busy_s()
        res = fleet_report(url, scheduler=cluster.scheduler_address)
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
        machine_cpu = _machine_busy_s() - m0
        sampler.stop()
        hwm = {p: _rss_kib(p)[1] for p in pids}
        cpu = {p: _cpu_s(p) - cpu0[p] for p in pids}
    kinds = collections.Counter(v.verdict for v in res.verdicts)
    if log:
        log(f"{workers} worker(s): {wall:.1f} s, {len(res.verdicts)} verdicts")
    return {"workers": workers, "seconds": round(wall, 2), "worker_cpu_s": round(sum(cpu.values()), 1),
            "cpu_s_per_worker": [round(cpu[p], 1) for p in pids],
            "peak_rss_mib": [round(hwm[p] / 1024) for p in pids],
            "peak_rss_sampled_mib": [round(sampler.peak[p] / 1024) for p in pids],
            "idle_worker_rss_mib": [round(base[p] / 1024) for p in pids], "rss_samples": sampler.samples,
            "load_1m": round(os.getloadavg()[0], 1), "client_cpu_s": round(client_cpu, 1),
            # what everything else on the machine used meanwhile (other users, the scheduler)
            "other_cpu_s": round(max(machine_cpu - sum(cpu.values()) - client_cpu, 0), 1), "client_rss_growth_mib": round((sampler.peak[me] - me_base) / 1024),
            "verdicts": len(res.verdicts), "by_kind": dict(sorted(kinds.items())),
            "_keys": sorted(_verdict_key(v) for v in res.verdicts),
            "_order": [(v.node, v.gpu, v.idle_start_ns) for v in res.verdicts]}


def _lake_for(spec: FleetSpec, workdir: str, procs: int, log, made: list) -> tuple:
    """(lake url, generation totals): reused when a lake of the same spec and generator is there."""
    name = f"fleet-{spec.nodes}n-{spec.gpus}g-{spec.hours:g}h-s{spec.seed}-r{spec.rate:g}-b{spec.batch_ms}"
    lake = os.path.join(workdir, name)
    manifest = lake + ".json"
    from stallscope.wire import lake as lake_mod
    want = {"generator": GENERATOR_VERSION, "lake": getattr(lake_mod, "LAKE_VERSION", None),
            "spec": dataclasses.asdict(spec)}
    if os.path.exists(manifest) and os.path.isdir(lake):
        with open(manifest) as f:
            got = json.load(f)
        if {k: got.get(k) for k in want} == want:
            log(f"reusing {lake} (generated in {got['totals']['seconds']} s)")
            return lake, dict(got["totals"], reused=True)
    shutil.rmtree(lake, ignore_errors=True)
    os.makedirs(lake)
    made += [lake, manifest]
    log(f"generating {spec.nodes} nodes x {spec.gpus} GPUs x {spec.hours:g} h into {lake} "
        f"({procs} processes)")
    tot = write_lake(spec, lake, procs, log)
    tot["lake_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(lake) for f in fs)
    with open(manifest, "w") as f:
        json.dump(dict(want, totals=tot), f)
    return lake, tot


def bench(spec: FleetSpec, workers: list, workdir: str, procs: int, log, made: list) -> list:
    """Generate (or reuse) the lake, run the report at each worker count; figure dicts.
    Paths this run created are added to ``made``."""
    lake, gen = _lake_for(spec, workdir, procs, log, made)
    figs = [{"suite": "fleet", "figure": "generate", "nodes": spec.nodes, "gpus": spec.nodes * spec.gpus,
             "hours": spec.hours, **gen}]
    runs = [run_report(lake, w, log) for w in workers]
    ev = gen["events"]
    for r in runs:
        scale = GOAL_NODES / spec.nodes / spec.hours         # to the goal's 1,024-node hour
        figs.append({"suite": "fleet", "figure": "report", "nodes": spec.nodes, "gpus": spec.nodes * spec.gpus,
                     "hours": spec.hours, "events": ev, "events_per_s": round(ev / r["seconds"]),
                     # the goal as a rate: this fleet's events per node-hour, 1,024 nodes, 180 s
                     "goal_events_per_s": round(ev * scale / GOAL_S),
                     # linear in node-hours (one task per node): an estimate, not a measurement
                     "projected_fleet_hour_s": round(r["seconds"] * scale),
                     "max_peak_rss_mib": max(r["peak_rss_mib"]),
                     **{k: v for k, v in r.items() if not k.startswith("_")}})
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        figs.append({"suite": "fleet", "figure": "compare", "nodes": spec.nodes,
                     "workers": [r["workers"] for r in runs],
                     "speedup": round(a["seconds"] / b["seconds"], 2),
                     # worker CPU with 1 / with 2 workers: 1.0 = splitting adds no work; a wall
                     # speed-up below this ratio means the workers did not get their cores
                     "worker_cpu_ratio": round(a["worker_cpu_s"] / max(b["worker_cpu_s"], 1e-9), 2),
                     "efficiency": round(a["seconds"] / b["seconds"] / (b["workers"] / a["workers"]), 2),
                     "verdicts_identical": all(r["_keys"] == a["_keys"] for r in runs),
                     "same_order": all(r["_order"] == a["_order"] for r in runs)})
    return figs


def summary(figs: list) -> str:
    lines = []
    for f in figs:
        if f["figure"] == "generate":
            lines.append(f"fleet: {f['nodes']} nodes, {f['gpus']} GPUs, {f['hours']:g} h: "
                         f"{f['samples']:,} NVML samples + {f['stall_rows']:,} stall rows = {f['events']:,} events "
                         f"({f['gpu_proc']:,} gpu_proc, {f['proc']:,} proc rows, {f['batches']:,} batches, "
                         f"{f['files']:,} files, {f.get('lake_bytes', 0) / GIB:.2f} GiB); generated in "
                         f"{f['seconds']} s{' (reused)' if f.get('reused') else ''} (not counted)")
        elif f["figure"] == "report":
            if f["nodes"] == GOAL_NODES and f["hours"] == 1:
                goal = f"   [goal <= {GOAL_S} s: {'met' if f['seconds'] <= GOAL_S else 'MISSED'}]"
            else:
                goal = (f"   (x{GOAL_NODES / f['nodes'] / f['hours']:g} to a {GOAL_NODES:,}-node hour, "
                        f"linearly: ~{f['projected_fleet_hour_s']:,} s; goal <= {GOAL_S} s)")
            lines.append(f"  {f['workers']} worker(s): {f['seconds']:8.1f} s wall{goal}")
            lines.append(f"      {f['events_per_s']:>12,} events/s   [goal >= {f['goal_events_per_s']:,}/s]   "
                         f"worker CPU {f['cpu_s_per_worker']} s, client CPU {f['client_cpu_s']} s "
                         f"(client RSS +{f['client_rss_growth_mib']} MiB); the rest of the machine used "
                         f"{f['other_cpu_s']} CPU-s meanwhile")
            lines.append(f"      peak RSS per worker {f['peak_rss_mib']} MiB (sampled {f['peak_rss_sampled_mib']}, "
                         f"idle {f['idle_worker_rss_mib']})   [goal <= {GOAL_RSS_MIB} MiB: "
                         f"{'met' if f['max_peak_rss_mib'] <= GOAL_RSS_MIB else 'MISSED'}]")
            lines.append(f"      verdicts {f['verdicts']:,}: " +
                         ", ".join(f"{k} {v:,}" for k, v in f["by_kind"].items()))
        elif f["figure"] == "compare":
            lines.append(f"  speed-up {f['workers'][0]} -> {f['workers'][-1]} workers: {f['speedup']}x "
                         f"(efficiency {f['efficiency']}; worker CPU ratio {f['worker_cpu_ratio']})   "
                         f"[goal: near-linear, >= 1.8x]")
            lines.append(f"  verdict lists identical across worker counts: {f['verdicts_identical']}"
                         f" (same order: {f['same_order']})")
        elif f["figure"] == "scaling":
            lines.append(f"peak RSS per worker vs fleet size ({f['workers']} worker(s)): " +
                         "; ".join(f"{n} nodes: {p} MiB" for n, p in zip(f["nodes"], f["max_peak_rss_mib"])) +
                         "; events per node: " + ", ".join(f"{e:,}" for e in f["events_per_node"]))
    return "\n".join(lines)


def main(quick: bool = False, argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=64 if quick else 1024)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=1.0, help="scale every stall and incident rate")
    ap.add_argument("--batch-ms", type=int, default=BATCH_MS,
                    help="batch period of the simulated tracers [250: the agent's; larger batches show "
                         "what the per-batch costs are]")
    ap.add_argument("--workers", default="1,2", help="Dask worker counts to run, in order [1,2]")
    ap.add_argument("--scale-nodes", type=int, default=None,
                    help="also run this smaller fleet (same per-node load) to compare peaks "
                         "[64; 0: skip; skipped when --nodes is not larger]")
    ap.add_argument("--lake", default=None, help="directory for the lake(s) [a temporary one]")
    ap.add_argument("--keep", action="store_true",
                    help="keep the lake (a later run with the same --lake and options reuses it)")
    ap.add_argument("--gen-procs", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes generating the lake")
    ap.add_argument("--json", action="store_true", help="one JSON line per figure on stdout")
    a = ap.parse_args(argv or [])
    try:
        workers = [int(x) for x in a.workers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--workers must be numbers separated by commas, not {a.workers!r}")
    if not workers or min(workers) < 1 or a.nodes < 1 or a.gpus < 1 or a.hours <= 0 or a.rate < 0 or a.batch_ms < 1:
        ap.error("--workers, --nodes, --gpus, --hours and --batch-ms must be positive, --rate not negative")
    scale = 64 if a.scale_nodes is None else a.scale_nodes
    log = (lambda m: print(f"bench fleet: {m}", file=sys.stderr, flush=True))
    workdir = a.lake or tempfile.mkdtemp(prefix="stallscope-fleet-")
    os.makedirs(workdir, exist_ok=True)
    made: list = []
    spec = FleetSpec(nodes=a.nodes, gpus=a.gpus, hours=a.hours, seed=a.seed, rate=a.rate, batch_ms=a.batch_ms)
    machine = f"{platform.node()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}"
    try:
        figs = bench(spec, workers, workdir, a.gen_procs, log, made)
        if 0 < scale < a.nodes:
            small = dataclasses.replace(spec, nodes=scale)
            sfigs = bench(small, workers, workdir, a.gen_procs, log, made)
            figs += sfigs
            for w in workers:
                big_r = next(f for f in figs if f["figure"] == "report" and f["workers"] == w and f["nodes"] == a.nodes)
                small_r = next(f for f in sfigs if f["figure"] == "report" and f["workers"] == w)
                figs.append({"suite": "fleet", "figure": "scaling", "workers": w, "nodes": [scale, a.nodes],
                             "max_peak_rss_mib": [small_r["max_peak_rss_mib"], big_r["max_peak_rss_mib"]],
                             "events_per_node": [small_r["events"] // scale, big_r["events"] // a.nodes]})
    finally:
        if not a.keep:          # what this run generated; a lake kept by an earlier run stays
            for p in made:
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)
            if not a.lake:
                shutil.rmtree(workdir, ignore_errors=True)
    for f in figs:
        f["machine"] = machine
    text = summary(figs)
    if a.json:
        for f in figs:
            print(json.dumps(f), flush=True)
        print(text, file=sys.stderr, flush=True)
    else:
        print(text, flush=True)
    if any(f["figure"] == "compare" and not f["verdicts_identical"] for f in figs):
        sys.exit(1)


if __name__ == "__main__":
    main(argv=sys.argv[1:])

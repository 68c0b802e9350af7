"""Fleet analysis on Dask: `stallscope report --lake URL [--scheduler ADDR]`.

The lake (:mod:`stallscope.wire.lake`) holds every node's batches; this runs the two stages of
:mod:`stallscope.analysis.analyze` as Dask tasks, so the result is the one ``analyze()`` gives
on the same batches, by construction:

1. one task per node: the worker reads the node's batches from the lake itself, runs
   :func:`~stallscope.analysis.analyze.node_stage`, builds the node's verdicts and drops its
   tables; what it keeps (a :class:`~stallscope.analysis.analyze.NodePart`) is small;
2. one task per job: :func:`~stallscope.analysis.analyze.job_stage` over every node's
   :class:`~stallscope.analysis.analyze.JobFacts` of that job (the findings, such as remote
   culprits); the facts travel worker to worker, never through the client;
3. one task per node of a job: its part takes the findings for it (the remote verdicts are
   built there, in parallel);
4. the client gathers the parts and runs :func:`~stallscope.analysis.analyze.assemble`.

A worker holds one node's tables at a time (one thread each), so its memory follows the
largest node, not the fleet.  Dask (``pip install 'stallscope[fleet]'``) is imported inside
the functions: the rest of the analysis imports without it.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import pickle
import uuid

from stallscope.wire.lake import LakeError, LakeReader, gc_paused

from . import analyze as _an

#: a scheduler that does not answer within this long is unreachable
CONNECT_TIMEOUT_S = 10
#: the tables ``analyze()`` keeps per node for the exports (``Result.nodes``)
EXPORT_KINDS = ("gpu", "gpu_proc", "proc", *_an.STALL_TABLES)


class FleetError(RuntimeError):
    """The fleet analysis cannot run: Dask is missing, a worker died.  The message says
    which; nothing is left running."""


class SchedulerError(FleetError):
    """The Dask scheduler given does not answer (or the local cluster asked for is not one)."""


def _no_gc():
    """The cyclic garbage collector paused: building or unpickling a node's verdicts makes
    many objects and no cycles, and each collection would rescan all of them (measured: 3x
    slower unpickling).  Process-wide: the workers run one task at a time."""
    return gc_paused()


# --------------------------------------------------------------------------- tasks (on workers)

def node_task(url: str, storage_options, node: str, since_ns, until_ns, p: dict,
              tables=None) -> _an.NodePart:
    """Stage 1 for one node, on a worker: read its batches from the lake (joined, as
    ``LakeReader.columns`` gives them: the state ``analyze()`` builds from the batches that
    ``LakeReader.batches`` rebuilds), the node stage, its verdicts; the tables are dropped
    (``tables``: the kinds kept for the exports, if any)."""
    nd = _an._Node(node)
    nd.absorb_columns(LakeReader(url, storage_options).columns(node, since_ns, until_ns))
    with _no_gc():
        part = _an.node_stage(node, nd, p)
        part.build()
        part.release()
        part.pack()
    if tables:
        part.tables = _an.export_tables(nd, tables)
    return part


def _jobs_of(part: _an.NodePart) -> list:
    return part.jobs()


# What travels between stages (facts, findings: many small objects) travels pickled: bytes
# cost Dask nothing to move, and the receiving task unpickles them with the collector paused.

def _dumps(obj) -> bytes:
    with _no_gc():
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _loads(blob: bytes):
    with _no_gc():
        return pickle.loads(blob)


def _facts_of(part: _an.NodePart, job: str) -> bytes:
    return _dumps(part.job_facts()[job])


def job_task(job: str, p: dict, *facts: bytes) -> dict:
    """Stage 2 for one job, on a worker: ``{node: pickled {interval: finding}}``."""
    found = _an.job_stage(job, [_loads(f) for f in facts], p)
    return {node: _dumps(f) for node, f in found.items()}


def _findings_for(found: dict, node: str) -> bytes:
    return found[node]


def finish_task(part: _an.NodePart, *findings: bytes) -> _an.NodePart:
    """Stage 3 for one node, on a worker: its part with the job stages' findings taken (the
    remote verdicts' chains are built here, in parallel); a copy, the stage 1 result stays as
    it was, and without the sources (the job stages are done with them)."""
    part = copy.copy(part)
    part.kind, part.findings, part.sources = part.kind.copy(), {}, {}
    with _no_gc():
        part.unpack()
        for f in findings:
            part.take(pickle.loads(f))
        part.pack()
    return part


# --------------------------------------------------------------------------- the client

def _dask():
    try:
        import distributed
    except ImportError:
        raise FleetError("the fleet report needs Dask: pip install 'stallscope[fleet]'") from None
    return distributed


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:          # not Linux
        return max(os.cpu_count() or 1, 1)


def _connect(distributed, scheduler, workers):
    """(client, cluster we started or None)."""
    import dask
    # a client whose event loop waits on a busy process (the scheduler of a local cluster
    # runs in this process; a 2-core machine shared with other work) must not be cut off
    # after dask's default 30 s of unread data: seen once as ETIMEDOUT mid-report
    if str(dask.config.get("distributed.comm.timeouts.tcp", "30s")) in ("30s", "30"):
        dask.config.set({"distributed.comm.timeouts.tcp": "300s"})
    if scheduler:
        try:
            return distributed.Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s",
                                      set_as_default=False), None
        except (OSError, TimeoutError, ValueError, TypeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SchedulerError(f"cannot reach the Dask scheduler {scheduler}: {why}") from None
    n = int(workers or default_workers())
    if n < 1:
        raise SchedulerError(f"a local cluster needs at least 1 worker, not {n}")
    # processes, one thread each: numpy holds the GIL between calls, and a worker then holds
    # one node's tables at a time; "auto": the machine's memory shared out evenly
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                       memory_limit="auto", dashboard_address=None,
                                       silence_logs=logging.ERROR)
    try:
        return distributed.Client(cluster, set_as_default=False), cluster
    except BaseException:
        cluster.close()
        raise


def fleet_report(url: str, scheduler: str | None = None, workers: int | None = None,
                 since_ns: int | None = None, until_ns: int | None = None,
                 storage_options: dict | None = None, progress=None, tables=None,
                 **params) -> _an.Result:
    """Verdicts for every GPU idle interval of the nodes in the lake at ``url`` (batches with
    wall time in [since_ns, until_ns)), computed on Dask; equal to ``analyze()`` of the same
    batches.

    ``scheduler``: a ``dask.distributed`` scheduler address (its workers must reach ``url``);
    without one, a local cluster of ``workers`` processes (default: one per CPU) runs for the
    call.  ``progress(stage, done, total)``: as tasks finish, stage "nodes" (stage 1),
    "jobs" (2), "verdicts" (3, one per node).
    ``tables``: table kinds to bring back per node into ``Result.nodes`` for the exports
    (:data:`EXPORT_KINDS` as ``analyze()`` keeps them; None: none).  Parameters are those of
    :data:`~stallscope.analysis.analyze.DEFAULTS`.  Raises LakeError (a URL no installed
    filesystem serves, no lake there), SchedulerError and FleetError."""
    p = _an._params(params)
    reader = LakeReader(url, storage_options)
    if not reader.fs.exists(reader.root):
        raise LakeError(f"no lake at {url}")
    nodes = reader.nodes(since_ns, until_ns)
    distributed = _dask()
    if not nodes and not scheduler:
        return _an.assemble([], p)              # nothing to run: no cluster to start
    report = progress or (lambda _stage, _done, _total: None)
    client, cluster = _connect(distributed, scheduler, workers)
    tag = uuid.uuid4().hex[:12]     # keys unique on a shared scheduler
    try:
        # stage 1: a task per node, and the jobs each node ran
        parts = [client.submit(node_task, url, storage_options, n, since_ns, until_ns, p,
                               None if tables is None else tuple(tables), key=f"stallscope-node-{i}-{tag}")
                 for i, n in enumerate(nodes)]
        job_lists = [client.submit(_jobs_of, f, key=f"stallscope-jobs-{i}-{tag}") for i, f in enumerate(parts)]
        index = {f.key: i for i, f in enumerate(job_lists)}
        where: dict = {}            # job -> node indexes
        report("nodes", 0, len(nodes))
        done = 0
        for fut, jobs in distributed.as_completed(job_lists, loop=client.loop, with_results=True):
            for j in jobs:
                where.setdefault(j, []).append(index[fut.key])
            done += 1
            report("nodes", done, len(nodes))
        del job_lists

        # stage 2: a task per job over its nodes' facts; stage 3: a task per node of a job
        # taking what the job stages found for it (only small facts and findings travel)
        names = sorted(where)
        found, per_node = [], collections.defaultdict(list)
        for k, job in enumerate(names):
            members = sorted(where[job])
            facts = [client.submit(_facts_of, parts[i], job, key=f"stallscope-facts-{i}-{k}-{tag}")
                     for i in members]
            found.append(client.submit(job_task, job, p, *facts, key=f"stallscope-job-{k}-{tag}"))
            for i in members:
                per_node[i].append(client.submit(_findings_for, found[-1], nodes[i],
                                                 key=f"stallscope-found-{i}-{k}-{tag}"))
        final = [client.submit(finish_task, f, *per_node[i], key=f"stallscope-final-{i}-{tag}")
                 if i in per_node else f for i, f in enumerate(parts)]
        del parts, per_node
        report("jobs", 0, len(names))
        for done, _f in enumerate(distributed.as_completed(found, loop=client.loop), 1):
            report("jobs", done, len(names))
        del found

        # the parts as they finish (each released on its worker once here), then the summary
        report("verdicts", 0, len(nodes))
        got = []
        finishing = distributed.as_completed(final, loop=client.loop, with_results=True)
        del final
        with _no_gc():
            for fut, part in finishing:
                part.unpack()
                got.append(part)
                report("verdicts", len(got), len(nodes))
                del fut, part
            res = _an.assemble(got, p)
    except distributed.KilledWorker as e:
        raise FleetError(f"a Dask worker died: {e} (out of memory? see the workers' logs; a "
                         "larger memory limit or fewer workers per host helps)") from None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if tables is not None:
        res.nodes = {x.name: x.tables for x in got}
    return res

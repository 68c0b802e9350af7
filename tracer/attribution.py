"""Who holds each GPU, as the cluster's schedulers say: Kubernetes pods (the kubelet's
pod-resources API) and Slurm jobs (the HPC job-mapping directory that DCGM exporter reads).

The tracer refreshes both at most every ``refresh_s`` (10 s) and ships them in the GPU meta
of each batch, per GPU: ``pods`` ([{namespace, pod, container}]) and ``jobs`` ([job id]).
The analysis puts them on the verdicts of that GPU. Either source may be absent (not a
Kubernetes node, no prolog installed): then that mapping is empty, said once in the log,
and nothing fails.

The job-mapping directory is DCGM exporter's layout (``--hpc-job-mapping-dir``,
``DCGM_HPC_JOB_MAPPING_DIR``): one file per GPU named by its index (``<index>.<gpu
instance>`` for a MIG instance), each holding the ids of the jobs on that GPU, one per line
(``0`` for none, as ``dcgm-job-map -init`` writes). ``deploy/slurm/prolog.sh`` and
``epilog.sh`` maintain it, so stallscope and DCGM exporter agree on GPU -> job.
"""

from __future__ import annotations

import os
import time

from . import podresources

#: the directory the GPU Operator mounts for DCGM exporter's HPC job mapping
DEFAULT_JOB_MAPPING_DIR = "/var/lib/dcgm-exporter/job-mapping"
JOB_MAPPING_ENV = "STALLSCOPE_JOB_MAPPING_DIR"


def read_job_mapping(directory: str):
    """``(mapping, errors)``: mapping is {file name (GPU index, or index.instance): [job ids,
    first seen first]} of a job-mapping directory, None when the directory cannot be listed
    (absent: errors 0); errors counts files that could not be read (skipped)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None, 0
    except OSError:
        return None, 1
    out, errors = {}, 0
    for name in names:
        gpu = name.split(".", 1)[0]
        if not gpu.isdigit() or name.endswith((".tmp", ".lock")) or name.startswith("."):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                jobs = [ln.strip() for ln in f.read().split("\n")]
        except (OSError, UnicodeDecodeError):
            errors += 1
            continue
        jobs = [j for j in jobs if j and j != "0"]
        if jobs:
            out[name] = list(dict.fromkeys(jobs))
    return out, errors


class GpuAttribution:
    """Pods and jobs per GPU (``gpus``: the sampler's [{index, uuid, ...}]), refreshed at
    most every ``refresh_s``. ``annotate(gpu_meta)`` adds them to a batch's GPU meta."""

    def __init__(self, gpus: list, socket_path: str = podresources.DEFAULT_SOCKET,
                 job_dir: str = DEFAULT_JOB_MAPPING_DIR, refresh_s: float = 10.0, log=None):
        self.gpus = [dict(g) for g in gpus]
        self.socket_path = socket_path
        self.job_dir = job_dir
        self.refresh_s = refresh_s
        self.log = log or (lambda m: None)
        self.pods: dict = {}            # gpu index -> [Holder]
        self.jobs: dict = {}            # gpu index -> [job id]
        self.unmatched: list = []       # GPU device ids the kubelet listed that match no GPU here
        self.errors = 0
        self.refreshes = 0
        self._next = 0.0
        self._said: set = set()

    def _say(self, key: str, msg: str):
        if key not in self._said:
            self._said.add(key)
            self.log(msg)

    def refresh(self, force: bool = False) -> bool:
        """Re-read both sources if ``refresh_s`` has passed (or ``force``); True if it did."""
        now = time.monotonic()
        if not force and now < self._next:
            return False
        self._next = now + self.refresh_s
        self.refreshes += 1
        self._refresh_pods()
        self._refresh_jobs()
        return True

    def _refresh_pods(self) -> None:
        if not os.path.exists(self.socket_path):
            self._say("pods-absent", f"pod-resources: {self.socket_path} absent "
                      "(not a Kubernetes node, or not mounted): no GPU -> pod mapping")
            self.pods, self.unmatched = {}, []
            return
        try:
            holders = podresources.gpu_holders(podresources.list_pods(self.socket_path))
        except podresources.PodResourcesError as e:
            self.errors += 1
            self._say(str(e), f"{e} (counted; keeping the last mapping)")
            return
        by_uuid = {g["uuid"]: g["index"] for g in self.gpus}
        by_index = {str(g["index"]): g["index"] for g in self.gpus}
        pods: dict = {}
        unmatched = []
        for dev, hs in holders.items():
            idx = by_uuid.get(dev, by_index.get(dev))
            if idx is None:
                unmatched.append(dev)       # a MIG instance, or a GPU NVML does not list
                continue
            lst = pods.setdefault(idx, [])
            lst += [h for h in hs if h not in lst]
        self.pods, self.unmatched = pods, sorted(unmatched)
        if pods:
            self._say("pods-ok", f"pod-resources: {sum(len(v) for v in pods.values())} GPU "
                      f"allocation(s) on {len(pods)} GPU(s)")

    def _refresh_jobs(self) -> None:
        mapping, errors = read_job_mapping(self.job_dir)
        self.errors += errors
        if mapping is None:
            self._say("jobs-absent", f"job mapping: {self.job_dir} absent: no GPU -> job mapping "
                      "(deploy/slurm/prolog.sh writes it; set STALLSCOPE_JOB_MAPPING_DIR)")
            self.jobs = {}
            return
        jobs: dict = {}
        for name, ids in mapping.items():
            lst = jobs.setdefault(int(name.split(".", 1)[0]), [])
            lst += [j for j in ids if j not in lst]
        self.jobs = jobs

    def for_gpu(self, index: int) -> dict:
        """{"pods": [...], "jobs": [...]} of one GPU, only the keys that are known."""
        out = {}
        if self.pods.get(index):
            out["pods"] = [h.to_json() for h in self.pods[index]]
        if self.jobs.get(index):
            out["jobs"] = list(self.jobs[index])
        return out

    def annotate(self, gpu_meta: dict) -> dict:
        """The GPU meta with each GPU entry's pods and jobs (a new dict; input unchanged)."""
        out = dict(gpu_meta)
        out["gpus"] = [{**g, **self.for_gpu(int(g["index"]))} for g in gpu_meta.get("gpus", [])]
        if self.unmatched:
            out["unmatched_devices"] = list(self.unmatched)
        out["attribution_errors"] = self.errors
        return out

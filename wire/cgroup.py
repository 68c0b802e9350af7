"""Which workload a process belongs to, from its cgroup path: Kubernetes pod and container,
Slurm job and step, or the systemd unit.

Pure parsing (no I/O but :func:`read_cgroup`), shared by the tracer (which ships the facts
of each process in its ``proc`` table) and the analysis. ``/proc/<pid>/cgroup`` has one line
per hierarchy, ``hierarchy-id:controllers:path``: cgroup v2 is the single line ``0::path``,
v1 one line per controller (a hybrid host has both). The layouts recognised:

* kubelet, systemd driver: ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid, '-' as '_'>.slice/cri-containerd-<64 hex>.scope``
  (``crio-<id>.scope`` for CRI-O, ``docker-<id>.scope`` for dockershim/cri-dockerd);
* kubelet, cgroupfs driver: ``/kubepods/burstable/pod<uid>/<64 hex>`` (guaranteed pods sit
  directly under ``/kubepods``);
* plain Docker, Podman: ``/docker/<id>``, ``/system.slice/docker-<id>.scope``,
  ``libpod-<id>.scope``;
* Slurm: ``/slurm/uid_<N>/job_<N>/step_<N>/task_<N>`` (v1), and v2's
  ``/system.slice/slurmstepd.scope/job_<N>/step_<N>/user/task_<N>``
  (also ``slurm_<node>`` for multiple slurmd per host, steps ``batch``, ``extern``,
  ``interactive``);
* anything else: the innermost systemd unit (``nvidia-persistenced.service``,
  ``session-3.scope``).

Paths seen from inside a cgroup namespace start with ``/..`` components (a tracer in a
container reading another container's file); the patterns match anywhere in the path.
"""

from __future__ import annotations

import dataclasses
import os
import re

_HEX64 = r"[0-9a-f]{64}"
#: container scope or directory: (runtime prefix, id)
_CONTAINER = re.compile(rf"^(?:(cri-containerd|crio|docker|libpod|containerd)-)?({_HEX64})(?:\.scope)?$")
_RUNTIME = {"cri-containerd": "containerd", "containerd": "containerd", "crio": "cri-o",
            "docker": "docker", "libpod": "podman"}
#: kubelet systemd driver: kubepods[-qos]-pod<uid with underscores>.slice
_POD_SLICE = re.compile(r"^kubepods(?:-(besteffort|burstable))?-pod([0-9a-f_]{36})\.slice$")
#: kubelet cgroupfs driver: pod<uid>
_POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")
_SLURM_JOB = re.compile(r"^job_(\d+)$")
_SLURM_STEP = re.compile(r"^step_(\w+)$")
_SLURM_UID = re.compile(r"^uid_(\d+)$")


@dataclasses.dataclass(frozen=True)
class CgroupFacts:
    """What a cgroup path says about its workload; empty strings where it says nothing."""

    path: str = ""              # the path the facts come from
    pod_uid: str = ""           # Kubernetes pod UID, with dashes (as the API shows it)
    qos: str = ""               # guaranteed | burstable | besteffort (Kubernetes)
    container_id: str = ""      # container id (64 hex) from a runtime scope or directory
    runtime: str = ""           # containerd | cri-o | docker | podman | "" (not named)
    slurm_job: str = ""         # Slurm job id
    slurm_step: str = ""        # Slurm step: a number, batch, extern, interactive
    slurm_uid: int = -1         # the job's user (v1 layout only)
    unit: str = ""              # innermost systemd unit (.service/.scope) that is not a container

    def score(self) -> int:
        """How much the path identifies: a workload (pod, container, job) beats a unit."""
        return 2 * (bool(self.pod_uid) + bool(self.container_id) + bool(self.slurm_job)) + bool(self.unit)


def parse_path(path: str) -> CgroupFacts:
    """The facts in one cgroup path (a v2 path, or one v1 hierarchy's)."""
    parts = [p for p in path.split("/") if p and p != ".."]
    f: dict = {"path": path}
    slurm_parent = False
    for i, p in enumerate(parts):
        m = _POD_SLICE.match(p)
        if m:
            f["pod_uid"] = m.group(2).replace("_", "-")
            f["qos"] = m.group(1) or "guaranteed"
            continue
        m = _POD_DIR.match(p)
        if m and i > 0 and parts[i - 1] in ("kubepods", "burstable", "besteffort"):
            f["pod_uid"] = m.group(1)
            f["qos"] = parts[i - 1] if parts[i - 1] != "kubepods" else "guaranteed"
            continue
        m = _CONTAINER.match(p)
        if m:
            f["container_id"] = m.group(2)
            f["runtime"] = _RUNTIME.get(m.group(1) or "", "")
            if not f["runtime"] and i > 0 and parts[i - 1] == "docker":
                f["runtime"] = "docker"
            continue
        if p.startswith("slurm"):          # slurm, slurm_<node>, slurmstepd.scope
            slurm_parent = True
        elif slurm_parent:
            m = _SLURM_UID.match(p)
            if m:
                f["slurm_uid"] = int(m.group(1))
                continue
            m = _SLURM_JOB.match(p)
            if m:
                f["slurm_job"] = m.group(1)
                continue
            m = _SLURM_STEP.match(p)
            if m and f.get("slurm_job"):
                f["slurm_step"] = m.group(1)
                continue
        if p.endswith((".service", ".scope")) and not p.startswith(("crio-conmon-",)):
            f["unit"] = p
    if f.get("container_id") or f.get("pod_uid") or f.get("slurm_job"):
        f.pop("unit", None)                # the unit is the runtime's, not the workload's
    return CgroupFacts(**f)


#: v1 hierarchies in the order they are trusted when two lines identify equally much
_V1_ORDER = ("name=systemd", "pids", "memory", "cpu,cpuacct", "cpuacct,cpu", "cpu", "devices")


def parse_proc_cgroup(text: str) -> CgroupFacts:
    """The facts in the contents of ``/proc/<pid>/cgroup`` (v1, v2 or hybrid): the line
    that identifies the workload best (a pod, container or job over a bare unit), the v2
    line first, then ``name=systemd``, ``pids``, ``memory``, the cpu controllers."""
    best, best_rank = CgroupFacts(), None
    for line in text.splitlines():
        hid, sep, rest = line.partition(":")
        ctrl, sep2, path = rest.partition(":")
        if not sep or not sep2 or not path.startswith("/"):
            continue
        facts = parse_path(path)
        if hid == "0" and ctrl == "":
            order = -1
        else:
            order = _V1_ORDER.index(ctrl) if ctrl in _V1_ORDER else len(_V1_ORDER)
        rank = (-facts.score(), order)
        if best_rank is None or rank < best_rank:
            best, best_rank = facts, rank
    return best


def read_cgroup(pid: int, proc: str = "/proc") -> CgroupFacts | None:
    """The facts of a process from ``<proc>/<pid>/cgroup``; None when it is gone or unreadable."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            return parse_proc_cgroup(f.read())
    except OSError:
        return None

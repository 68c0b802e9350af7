"""Pod, container and Slurm job from cgroup paths (wire/cgroup.py): a table of the layouts
kubelet, container runtimes and Slurm make, this host's own /proc/self/cgroup, real cgroups
made here (root), and the facts reaching the tracer's proc table."""

import os
import time

import numpy as np
import pytest

from stallscope.tracer import procinfo
from stallscope.wire.cgroup import CgroupFacts, parse_path, parse_proc_cgroup, read_cgroup
from tests.cgrouputil import moved_child

CID = "3f1c9a2e7b4d5c6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"
UID = "0c6d3a7e-5f2b-4d1a-9e8c-7b6a5f4e3d2c"
UID_ = UID.replace("-", "_")

# (path, expected non-default fields)
LAYOUTS = [
    # kubelet, systemd cgroup driver (cgroup v2 or v1), containerd / CRI-O / cri-dockerd
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     dict(pod_uid=UID, qos="burstable", container_id=CID, runtime="containerd")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
     dict(pod_uid=UID, qos="besteffort", container_id=CID, runtime="cri-o")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope",
     dict(pod_uid=UID, qos="guaranteed", container_id=CID, runtime="docker")),
    # the pod's own slice (the pause process's parent, or a process moved out of its container)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
     dict(pod_uid=UID, qos="burstable")),
    # CRI-O's conmon beside the container: the pod, but no container of its own
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
     dict(pod_uid=UID, qos="burstable")),
    # kubelet, cgroupfs driver
    (f"/kubepods/burstable/pod{UID}/{CID}", dict(pod_uid=UID, qos="burstable", container_id=CID)),
    (f"/kubepods/besteffort/pod{UID}/{CID}", dict(pod_uid=UID, qos="besteffort", container_id=CID)),
    (f"/kubepods/pod{UID}/{CID}", dict(pod_uid=UID, qos="guaranteed", container_id=CID)),
    # seen from inside another container's cgroup namespace (a DaemonSet reading host pids)
    (f"/../../../kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     dict(pod_uid=UID, qos="burstable", container_id=CID, runtime="containerd")),
    # plain Docker and Podman
    (f"/system.slice/docker-{CID}.scope", dict(container_id=CID, runtime="docker")),
    (f"/docker/{CID}", dict(container_id=CID, runtime="docker")),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
     dict(container_id=CID, runtime="podman")),
    # Slurm: cgroup v1 (task/cgroup plugin), v2 (cgroup/v2 plugin), multiple-slurmd
    ("/slurm/uid_1000/job_4242/step_0/task_1", dict(slurm_job="4242", slurm_step="0", slurm_uid=1000)),
    ("/slurm/uid_1000/job_4242/step_batch/task_0", dict(slurm_job="4242", slurm_step="batch", slurm_uid=1000)),
    ("/system.slice/slurmstepd.scope/job_77/step_extern/user/task_special",
     dict(slurm_job="77", slurm_step="extern")),
    ("/system.slice/slurmstepd.scope/job_77/step_3/user/task_0", dict(slurm_job="77", slurm_step="3")),
    ("/slurm_node17/uid_0/job_9/step_interactive/task_0",
     dict(slurm_job="9", slurm_step="interactive", slurm_uid=0)),
    # slurmstepd's own cgroup: no job
    ("/system.slice/slurmstepd.scope/system", dict(unit="slurmstepd.scope")),
    # plain systemd services and sessions
    ("/system.slice/nvidia-persistenced.service", dict(unit="nvidia-persistenced.service")),
    ("/user.slice/user-1000.slice/session-3.scope", dict(unit="session-3.scope")),
    ("/", {}),
    # look-alikes that are not workloads
    ("/system.slice/job_12.service", dict(unit="job_12.service")),      # job_N outside slurm
    ("/kubepods.slice/notapod.slice", {}),
    (f"/pods/pod{UID}", {}),                                            # pod<uid> outside kubepods
    ("/system.slice/docker-1234.scope", dict(unit="docker-1234.scope")),  # not a 64-hex id
]


@pytest.mark.parametrize("path,want", LAYOUTS, ids=[p for p, _ in LAYOUTS])
def test_layouts(path, want):
    assert parse_path(path) == CgroupFacts(path=path, **want)


def test_v1_lines_pick_the_one_that_names_the_workload():
    """cgroup v1: one line per controller. With the systemd driver every controller shows the
    container's scope; the cpuset line of an old runtime may lag at '/'; a hybrid host has the
    unified '0::' line too."""
    scope = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    text = "\n".join([
        "12:cpuset:/",
        f"11:memory:{scope}",
        f"10:pids:{scope}",
        "9:devices:/system.slice/containerd.service",
        f"1:name=systemd:{scope}",
        "0::/system.slice/containerd.service",
    ]) + "\n"
    f = parse_proc_cgroup(text)
    assert (f.pod_uid, f.container_id, f.path) == (UID, CID, scope)


def test_v2_single_line_and_slurm_v1():
    assert parse_proc_cgroup("0::/system.slice/slurmstepd.scope/job_5/step_0/user/task_0\n").slurm_job == "5"
    v1 = "5:memory:/slurm/uid_1000/job_31/step_0/task_0\n4:cpuset:/slurm/uid_1000/job_31/step_0\n1:name=systemd:/system.slice/slurmd.service\n"
    f = parse_proc_cgroup(v1)
    assert (f.slurm_job, f.slurm_step, f.slurm_uid, f.unit) == ("31", "0", 1000, "")


def test_nothing_known_prefers_v2_then_systemd_line():
    text = "3:cpu:/a.slice/x.service\n1:name=systemd:/system.slice/sshd.service\n0::/system.slice/cron.service\n"
    assert parse_proc_cgroup(text).unit == "cron.service"
    assert parse_proc_cgroup(text.replace("0::/system.slice/cron.service\n", "")).unit == "sshd.service"


@pytest.mark.parametrize("junk", ["", "garbage", "1:cpu", "x:y:relative/path", "\n\n"])
def test_malformed_input_gives_no_facts(junk):
    assert parse_proc_cgroup(junk) == CgroupFacts()


def test_this_hosts_proc_self_cgroup():
    """The real file: every line parses, and the chosen facts are those of the line that
    identifies most (the unified line, or the first v1 hierarchy in order, on a tie)."""
    text = open("/proc/self/cgroup").read()
    lines = [ln for ln in text.splitlines() if ln]
    assert lines, "empty /proc/self/cgroup"
    paths = [ln.split(":", 2)[2] for ln in lines]
    f = parse_proc_cgroup(text)
    assert f.path in paths
    assert f == parse_path(f.path)
    assert f.score() == max(parse_path(p).score() for p in paths)
    if any(ln.startswith("0::") for ln in lines):
        v2 = next(ln.split(":", 2)[2] for ln in lines if ln.startswith("0::"))
        if parse_path(v2).score() == f.score():
            assert f.path == v2
    assert read_cgroup(os.getpid()) == f


def test_read_cgroup_of_a_gone_process(tmp_path):
    assert read_cgroup(424242, str(tmp_path)) is None


# ------------------------------------------------------------------ real cgroups (root)
def _cgroup_root():
    """Where this host lets us make a cgroup: the v2 unified root, or the v1 pids hierarchy."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "/sys/fs/cgroup"
    if os.path.isdir("/sys/fs/cgroup/pids"):
        return "/sys/fs/cgroup/pids"
    return None


REAL = [
    (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podSSUID.slice/cri-containerd-{CID}.scope",
     lambda f, uid: f.pod_uid == uid and f.container_id == CID and f.runtime == "containerd"),
    ("slurm/uid_0/job_4243/step_0/task_0", lambda f, uid: (f.slurm_job, f.slurm_step) == ("4243", "0")),
]


@pytest.mark.bpf
@pytest.mark.parametrize("rel,check", REAL, ids=["kubelet-systemd", "slurm"])
def test_real_cgroup_of_a_process_moved_into_it(rel, check):
    """The kernel writes the line: make the cgroup, move a child into it, read its
    /proc/<pid>/cgroup through the parser (v1 pids hierarchy or v2, whichever this host has)."""
    root = _cgroup_root()
    if root is None:
        pytest.skip("no cgroup hierarchy to make a cgroup in")
    uid = f"5ca1ab1e-0000-4000-8000-{os.getpid():012d}"
    rel = rel.replace("SSUID", uid.replace("-", "_"))
    with moved_child(root, rel) as pid:
        facts = read_cgroup(pid)
        assert facts is not None and check(facts, uid), (open(f"/proc/{pid}/cgroup").read(), facts)


# ------------------------------------------------------------------ into the proc table
def _fake_proc(root, pid, ppid, comm, env, cgroup):
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0\n")
    (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()) + b"\0")
    (d / "cgroup").write_text(cgroup)


def test_proc_table_carries_pod_container_and_slurm_job_from_cgroup(tmp_path):
    (tmp_path / "stat").write_text("cpu 0\nbtime 1700000000\n")
    scope = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    _fake_proc(tmp_path, 100, 1, "python", {"RANK": "0"}, f"0::{scope}\n")
    # a Slurm task whose environment was scrubbed: the job comes from its cgroup
    _fake_proc(tmp_path, 200, 1, "train", {}, "0::/system.slice/slurmstepd.scope/job_88/step_0/user/task_0\n")
    # the environment wins over the cgroup
    _fake_proc(tmp_path, 300, 1, "train", {"SLURM_JOB_ID": "99"},
               "0::/system.slice/slurmstepd.scope/job_88/step_0/user/task_0\n")
    pc = procinfo.ProcCache(str(tmp_path))
    t = pc.table_for(np.array([100, 200, 300]))
    rows = {int(p): (j, pu, ci) for p, j, pu, ci in zip(t["pid"], t["job"], t["pod_uid"], t["container_id"])}
    assert rows == {100: ("", UID, CID), 200: ("88", "", ""), 300: ("99", "", "")}


def test_forked_worker_inherits_pod_and_container(tmp_path):
    (tmp_path / "stat").write_text("cpu 0\nbtime 1700000000\n")
    scope = f"/kubepods/burstable/pod{UID}/{CID}"
    _fake_proc(tmp_path, 100, 1, "python", {}, f"4:pids:{scope}\n")
    pc = procinfo.ProcCache(str(tmp_path))
    now = time.time_ns()
    pc.kernel_lineage(now - 10**9)
    pc.lookup(100)
    pc.ingest({"ts_ns": np.array([now], dtype=np.uint64), "op": np.array(["fork"], dtype=object),
               "pid": np.array([101], dtype=np.uint64), "ppid": np.array([100], dtype=np.uint64),
               "comm": np.array(["pt_data_worker"], dtype=object)})
    t = pc.table_for(np.array([101]), np.array([now + 1]))
    rows = {int(p): (pu, ci) for p, pu, ci in zip(t["pid"], t["pod_uid"], t["container_id"])}
    assert rows[101] == (UID, CID)


def test_gpu_holders_trim_keeps_what_is_in_force():
    from stallscope.analysis.attribution import GpuHolders

    h = GpuHolders()
    for t in range(100):                     # the job on GPU 0 changes every second
        h.absorb([{"index": 0, "jobs": [str(t)]}], t * 1_000_000_000)
    h.trim(90_500_000_000)
    assert h.job(0, 90_600_000_000) == "90" and h.job(0, 99_000_000_000) == "99"
    assert len(h.hist[0][0]) == 10

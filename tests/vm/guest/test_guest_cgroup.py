"""Pod/container/job attribution on cgroup v2 (the guest is Debian 12 with systemd): the
parser on the guest's own /proc/self/cgroup, and on cgroups made here the way kubelet's
systemd driver and Slurm's cgroup/v2 plugin name them, with a process moved in by the kernel.

Runs in the guest's one pytest session (no extra boot)."""

from __future__ import annotations

import os

import pytest

from stallscope.wire.cgroup import parse_proc_cgroup, read_cgroup
from tests.cgrouputil import moved_child

CG = "/sys/fs/cgroup"
CID = "9e1f4c2a7b3d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"


def test_guest_is_cgroup_v2_and_own_cgroup_parses():
    assert os.path.exists(f"{CG}/cgroup.controllers"), "guest is not on the unified hierarchy"
    text = open("/proc/self/cgroup").read()
    lines = [ln for ln in text.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("0::"), text
    f = parse_proc_cgroup(text)
    assert f.path == lines[0][3:]
    # the suite runs from a systemd service: its unit, and no workload
    assert f.unit.endswith((".service", ".scope")), f
    assert not (f.pod_uid or f.container_id or f.slurm_job), f


@pytest.mark.parametrize("rel,want", [
    ("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{cid}.scope",
     lambda f, uid: (f.pod_uid, f.container_id, f.qos, f.runtime) == (uid, CID, "burstable", "containerd")),
    ("system.slice/slurmstepd.scope/job_4243/step_0/user/task_0",
     lambda f, uid: (f.slurm_job, f.slurm_step) == ("4243", "0")),
], ids=["kubelet-systemd", "slurm-v2"])
def test_real_v2_cgroup_of_a_moved_process(rel, want):
    uid = f"5ca1ab1e-0000-4000-8000-{os.getpid():012d}"
    rel = rel.format(uid_=uid.replace("-", "_"), cid=CID)
    with moved_child(CG, rel) as pid:
        facts = read_cgroup(pid)
        line = open(f"/proc/{pid}/cgroup").read()
        assert line.strip() == f"0::/{rel}", line
        assert facts is not None and want(facts, uid), facts

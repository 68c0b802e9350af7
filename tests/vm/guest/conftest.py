"""Fixtures for the tests that run inside the stallscope test VM (Debian 12, kernel 6.1).

These tests need what only the VM has: kprobes, an NFS server and client, soft-RoCE,
netem. They run as root in the guest, from the shared checkout (PYTHONPATH is the
repository), with Debian's python3 and python3-bpfcc. ``tests/vm/conftest.py`` collects
this directory only inside the guest (marked by /etc/stallscope-vm-guest); on the host
the vm tier boots the VM and runs them there.

The fixtures drive the helpers that vagrant/provision.sh installs
(``stallscope-nfs-up``, ``stallscope-rxe-up``, ``stallscope-netem``) so tests and
people at the guest's shell set things up the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from guestutil import run

GUEST_MARKER = Path("/etc/stallscope-vm-guest")


@pytest.fixture(scope="session", autouse=True)
def _only_in_the_guest():
    if not GUEST_MARKER.exists():
        pytest.skip("runs only inside the stallscope test VM (the vm tier boots it: pytest -m vm tests/vm)")


@pytest.fixture(scope="session")
def nfs_mounts() -> dict[str, Path]:
    """NFS v3 and v4.2 mounts of the guest's own /srv/nfs over 127.0.0.1: {"3": path, "4.2": path}.

    The server side of every file is /srv/nfs/<same name>.
    """
    paths = run("stallscope-nfs-up", "3", "4.2").split()
    yield {"3": Path(paths[0]), "4.2": Path(paths[1])}
    run("stallscope-nfs-down")


@dataclass(frozen=True)
class RxeDevice:
    """A soft-RoCE device and the GID index of its IPv4 address (for ``-g`` / ah_attr.grh)."""

    name: str
    netdev: str
    ipv4: str
    ipv4_gid_index: int


@pytest.fixture(scope="session")
def rxe_device() -> RxeDevice:
    """rxe0 on a dummy netdev with 192.0.2.1; RDMA between its own GIDs loops back in rdma_rxe."""
    run("stallscope-rxe-up")
    gids = Path("/sys/class/infiniband/rxe0/ports/1/gids")
    index = None
    for _ in range(50):  # the IPv4 GID appears once the address event reaches rdma_rxe
        for entry in sorted(gids.iterdir(), key=lambda p: int(p.name)):
            try:
                gid = entry.read_text().strip()
            except OSError:  # an unused entry reads as EINVAL
                continue
            if gid == "0000:0000:0000:0000:0000:ffff:c000:0201":
                index = int(entry.name)
                break
        if index is not None:
            break
        time.sleep(0.1)
    if index is None:
        pytest.fail("rxe0 has no GID for 192.0.2.1", pytrace=False)
    yield RxeDevice("rxe0", "ssdummy0", "192.0.2.1", index)
    run("stallscope-rxe-down")


@pytest.fixture
def netem():
    """A function ``netem(dev, *args)`` that puts a netem qdisc on ``dev``; removed after the test."""
    devices = []

    def apply(dev: str, *args: str) -> str:
        devices.append(dev)
        return run("stallscope-netem", dev, *args)

    yield apply
    for dev in devices:
        run("stallscope-netem", dev, "off")


# ---------------------------------------------------------------------------- probe tests
# Shared by the test_probes_* modules (see probe_env.py): the tracers start once, early.

from probe_env import ProbeTracers, rxe_pair_down, rxe_pair_up, run_nfs_load, start_probe_tracers  # noqa: E402


@pytest.fixture(scope="session")
def rxe_pair():
    """Two soft-RoCE devices over a veth pair whose traffic crosses the wire (netem applies)."""
    pair = rxe_pair_up()
    yield pair
    rxe_pair_down(pair)


@pytest.fixture(scope="session")
def probe_tracers(nfs_mounts, rxe_pair, tmp_path_factory) -> ProbeTracers:
    """The three long-running tracers (started, not necessarily ready: see TracerProcess.wait_ready)."""
    t = start_probe_tracers(tmp_path_factory.mktemp("tracers"), nfs_mounts, rxe_pair)
    yield t
    for tr in t.all():
        tr.stop()


@pytest.fixture(scope="session", autouse=True)
def _probe_tracers_start_early(request):
    """Start the tracers with the session when probe tests were collected, so their BPF
    compiles overlap the other guest tests instead of delaying the first probe test."""
    if any(item.module.__name__.startswith("test_probes") for item in request.session.items):
        request.getfixturevalue("probe_tracers")


@pytest.fixture(scope="session")
def nfs_loads(probe_tracers) -> dict:
    """nfsload.py once per NFS version (3, 4.2), under netem delay, while all tracers watch."""
    probe_tracers.vfs_tcp.wait_ready()
    probe_tracers.nfs_rdma.wait_ready()
    probe_tracers.vfs_fentry.is_ready()      # its own test reports a failure to start
    return {v: run_nfs_load(v, m) for v, m in probe_tracers.mounts.items()}

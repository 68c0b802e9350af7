"""Fixtures for the tests that run inside the stallscope test VM (Debian 11/12/13: 5.10, 6.1, 6.12).

These tests need what only the VM has: kprobes, an NFS server and client, soft-RoCE,
netem. They run as root in the guest, from the shared checkout (PYTHONPATH is the
repository), with Debian's python3 (3.9 on Debian 11: no 3.10+ syntax or library here)
and python3-bpfcc. ``tests/vm/conftest.py`` collects this directory only inside the
guest (marked by /etc/stallscope-vm-guest); on the host the vm tier boots the VM and
runs them there, once per kernel (``STALLSCOPE_VM_KERNEL`` names the series).

The kernel matrix: a test that proves a probe with one attach method carries
``@pytest.mark.matrix(ROW, METHOD)``; its outcome on this kernel (proven, failed, or
unavailable with the reason the test asserted, through the ``matrix_unavailable``
fixture) goes into ``$STALLSCOPE_VM_RESULT`` (result.json, with the kernel, BCC and
python versions and each tracer's family lines), which ``tests/vm/matrix.py`` renders.

The fixtures drive the helpers that vagrant/provision.sh installs
(``stallscope-nfs-up``, ``stallscope-rxe-up``, ``stallscope-netem``) so tests and
people at the guest's shell set things up the same way.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from guestutil import kernel_series, run

GUEST_MARKER = Path("/etc/stallscope-vm-guest")

#: what goes into result.json (see the module docstring)
RESULT: dict = {"cells": [], "tracers": {}}


def pytest_configure(config):
    config.addinivalue_line("markers", "matrix(row, method): proves README kernel-matrix row ROW "
                            "with attach METHOD on this kernel")


@pytest.fixture
def matrix_unavailable(request):
    """``matrix_unavailable(reason)``: this kernel cannot run the test's probe with its method,
    for ``reason`` (which the test has asserted); the cell says so instead of "proven"."""
    def note(reason: str) -> None:
        request.node.user_properties.append(("matrix_unavailable", reason))
    return note


@pytest.fixture
def matrix_note(request):
    """``matrix_note(text)``: the probe is proven on this kernel, with a qualification (e.g. an
    optional attach target this kernel lacks), shown in its cell."""
    def note(text: str) -> None:
        request.node.user_properties.append(("matrix_note", text))
    return note


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    mark = item.get_closest_marker("matrix")
    if mark is None or not (rep.when == "call" or rep.outcome != "passed"):
        return
    if rep.when == "teardown" and rep.outcome == "passed":
        return
    row, method = mark.args
    unavailable = [v for k, v in item.user_properties if k == "matrix_unavailable"]
    status = {"passed": "proven", "failed": "failed", "skipped": "skipped"}[rep.outcome]
    if status == "proven" and unavailable:
        status = "unavailable"
    note = unavailable[0] if unavailable else "; ".join(v for k, v in item.user_properties if k == "matrix_note")
    if rep.outcome != "passed":
        if isinstance(rep.longrepr, tuple):             # a skip: (file, line, reason)
            text = str(rep.longrepr[2])
        else:
            crash = getattr(rep.longrepr, "reprcrash", None)
            text = str(crash.message) if crash is not None else rep.longreprtext
        note = text.strip().splitlines()[0][:300] if text.strip() else rep.outcome
    RESULT["cells"].append({"row": row, "method": method, "test": item.nodeid.split("::", 1)[-1],
                            "when": rep.when, "status": status, "note": note})


def _bcc_version() -> str:
    try:
        import bcc
        return str(getattr(bcc, "__version__", "unknown"))
    except Exception as e:      # the result says why rather than failing the session end
        return f"unavailable ({type(e).__name__}: {e})"


def pytest_sessionfinish(session, exitstatus):
    """Write result.json for the host (STALLSCOPE_VM_RESULT), whatever the outcome."""
    out = os.environ.get("STALLSCOPE_VM_RESULT")
    if not out:
        return
    RESULT.update(kernel_release=os.uname().release, kernel_series=kernel_series(),
                  expected_series=os.environ.get("STALLSCOPE_VM_KERNEL", ""),
                  debian=Path("/etc/debian_version").read_text().strip(),
                  python=platform.python_version(), bcc=_bcc_version(), pytest_exit=int(exitstatus))
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULT, f, indent=1, sort_keys=True)
    os.replace(tmp, out)


def family_lines(stderr: str) -> dict:
    """{family: what the tracer said it loaded, or why not} from a tracer's stderr."""
    fams = {}
    for line in stderr.splitlines():
        m = re.match(r"(?:stallscope: )?(vfs|tcp|block|nfs|rdma|sched): (.*)", line.strip())
        if m:
            fams[m.group(1)] = m.group(2)
    return fams


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


@pytest.fixture(scope="session")
def null_blk() -> str:
    """/dev/nullb0: a null_blk disk whose every request completes 100 ms after the driver
    queues it (timer completions), the slow device the block tests read."""
    if Path("/sys/module/null_blk").exists():
        run("rmmod", "null_blk")
    run("modprobe", "null_blk", "nr_devices=1", "irqmode=2", "completion_nsec=100000000", "gb=1")
    dev = Path("/dev/nullb0")
    for _ in range(50):     # devtmpfs adds the node as the disk registers
        if dev.exists():
            break
        time.sleep(0.1)
    if not dev.exists():
        pytest.fail("modprobe null_blk made no /dev/nullb0", pytrace=False)
    # let udev finish with the new disk first, so that the test's reads are the device's only
    # ones (its storage rules do not probe nullb*, so this is a precaution)
    subprocess.run(["udevadm", "settle", "--timeout=60"], capture_output=True)
    yield str(dev)
    subprocess.run(["rmmod", "null_blk"], capture_output=True)     # best effort: udev may still hold it


@pytest.fixture
def result_gaps() -> list:
    """A list in result.json ("gaps") for what a test tolerates but is still an open bug;
    the host's terminal summary prints each."""
    return RESULT.setdefault("gaps", [])


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
        RESULT["tracers"][tr.name] = {"argv": tr.argv[3:], "families": family_lines(tr.stderr)}
    RESULT["tracers"]["tp"]["counters"] = last_counters(t.tp_recording)
    for gap in RESULT.get("gaps", []):      # a request only late (still in flight, delayed) shows now
        if gap["test"] == "block":
            late = {e["sector"] for e in t.tp.events(lambda e: e["type"] == "block" and e["pid"] == gap["pid"])}
            gap["arrived_later"] = sorted(late & set(gap["missing_sectors"]))


def last_counters(recording: Path) -> dict:
    """The counters of a recording's last batch (kernel counters are running totals), or
    {"error": why}: what a tracer lost, for result.json."""
    from stallscope.collector.store import load_batches
    try:
        batches = load_batches(str(recording))
    except Exception as e:      # a diagnostic: never fails the session
        return {"error": f"{type(e).__name__}: {e}"}
    return dict(max(batches, key=lambda b: b.seq).counters) if batches else {}


@pytest.fixture(scope="session", autouse=True)
def _probe_tracers_start_early(request):
    """Start the tracers with the session when probe tests were collected, so their BPF
    compiles overlap the other guest tests instead of delaying the first probe test."""
    if any(item.module.__name__.startswith("test_probes") for item in request.session.items):
        request.getfixturevalue("probe_tracers")


@pytest.fixture(scope="session")
def nfs_loads(probe_tracers) -> dict:
    """nfsload.py once per NFS version (3, 4.2), under netem delay, while all tracers watch."""
    for t in probe_tracers.all():    # ready, or given up: each test reports its own tracer's failure
        t.is_ready()
    return {v: run_nfs_load(v, m) for v, m in probe_tracers.mounts.items()}


@pytest.fixture(scope="session")
def xfer_loads(probe_tracers) -> dict:
    """nfsload.py --xfer once per NFS version (sendfile, splice, copy_file_range, io_uring reads),
    under netem delay, while all tracers watch."""
    for t in probe_tracers.all():
        t.is_ready()
    return {v: run_nfs_load(v, m, xfer=True) for v, m in probe_tracers.mounts.items()}

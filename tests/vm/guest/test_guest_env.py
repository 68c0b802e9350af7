"""The test VM gives what the kernel-probe tests need: each check uses it for real.

Runs inside the guest (see conftest.py here): the Debian kernel of the matrix with headers,
a BCC kprobe counting a known number of reads, NFS v3 and v4.2 over 127.0.0.1,
soft-RoCE with a working verbs data path, and netem on loopback that really delays
and drops.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from guestutil import kernel_series, run

HERE = Path(__file__).resolve().parent
READS = 23  # a count that cannot come from unrelated activity


def test_kernel_is_the_expected_debian_kernel_with_headers():
    """The image booted the kernel the host asked for (STALLSCOPE_VM_KERNEL: 5.10, 6.1, 6.12)."""
    release = os.uname().release
    expected = os.environ.get("STALLSCOPE_VM_KERNEL")
    assert expected, "STALLSCOPE_VM_KERNEL is not set (the vm tier's guest script sets it)"
    assert kernel_series(release) == expected, f"guest kernel is {release}, expected Debian {expected}"
    assert "Debian" in Path("/proc/version").read_text()
    assert Path(f"/lib/modules/{release}/build/include").is_dir(), f"no headers for {release}: BCC cannot compile"


def test_bcc_kprobe_counts_reads_of_a_file_by_a_child(tmp_path):
    from bcc import BPF

    data = tmp_path / "data"
    data.write_bytes(b"x" * 64)
    bpf = BPF(src_file=str(HERE / "count_vfs_read.bpf.c").encode(), cflags=[f"-DTARGET_INO={data.stat().st_ino}ULL"])
    try:
        bpf.attach_kprobe(event=b"vfs_read", fn_name=b"count_vfs_read")
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the go, then read the file READS times, one byte each
            status = 1
            try:
                os.close(go_write)
                os.read(go_read, 1)
                fd = os.open(data, os.O_RDONLY)
                for _ in range(READS):
                    os.read(fd, 1)
                status = 0
            finally:
                os._exit(status)
        os.close(go_read)
        bpf[b"target_tgid"][ct.c_int(0)] = ct.c_uint(pid)
        os.write(go_write, b"g")
        os.close(go_write)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0, "the reading child failed"
        count = bpf[b"reads"][ct.c_int(0)].value
    finally:
        bpf.cleanup()
    assert count == READS, f"kprobe on vfs_read counted {count} reads of the file by pid {pid}, expected {READS}"


def _mount_entry(mount_point: Path) -> tuple[str, str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, where, fstype, options = line.split()[:4]
        if where == str(mount_point):
            return fstype, options
    pytest.fail(f"{mount_point} is not mounted", pytrace=False)


@pytest.mark.parametrize("version", ["3", "4.2"])
def test_nfs_loopback_mount_writes_reach_the_server_and_back(nfs_mounts, version):
    mount = nfs_mounts[version]
    fstype, options = _mount_entry(mount)
    assert fstype == ("nfs" if version == "3" else "nfs4"), options
    assert f"vers={version}" in options.split(","), options
    assert "addr=127.0.0.1" in options.split(","), options

    name = f"probe-v{version}-{os.getpid()}"
    payload = os.urandom(4096 * READS)
    with open(mount / name, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert (Path("/srv/nfs") / name).read_bytes() == payload, "client write did not reach the export"
    back = os.urandom(4096)
    (Path("/srv/nfs") / f"{name}.back").write_bytes(back)
    assert (mount / f"{name}.back").read_bytes() == back, "server-side file not readable through the mount"

    assert run("stallscope-nfs-up", version).split() == [str(mount)]  # idempotent
    assert sum(line.split()[1] == str(mount) for line in Path("/proc/mounts").read_text().splitlines()) == 1


def test_soft_roce_device_and_verbs_pingpong(rxe_device):
    links = run("rdma", "link", "show")
    assert re.search(rf"link {rxe_device.name}/1 state ACTIVE .*netdev {rxe_device.netdev}", links), links
    assert rxe_device.name in run("ibv_devices")
    run("stallscope-rxe-up")  # idempotent: the same device, not a second one
    assert run("rdma", "link", "show").count(f"link {rxe_device.name}/") == 1

    # The verbs data path: READS RC send/recv round trips between two processes on rxe0.
    args = ["ibv_rc_pingpong", "-d", rxe_device.name, "-g", str(rxe_device.ipv4_gid_index),
            "-n", str(READS), "-p", "18515"]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            client = subprocess.run([*args, "127.0.0.1"], capture_output=True, text=True, timeout=60)
            if client.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.5)  # the server is not listening yet
        server_out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert client.returncode == 0, f"client: {client.stdout}{client.stderr}\nserver: {server_out}"
    assert server.returncode == 0, server_out
    assert f"{READS} iters in" in client.stdout and f"{READS} iters in" in server_out


def _tcp_round_trips(count: int) -> float:
    """Seconds for ``count`` one-byte request/response round trips over 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)

    def echo():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            for _ in range(count):
                conn.sendall(conn.recv(1))

    server = threading.Thread(target=echo)
    server.start()
    with socket.create_connection(listener.getsockname(), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        for _ in range(count):
            sock.sendall(b"p")
            assert sock.recv(1) == b"p"
        elapsed = time.monotonic() - start
    server.join(60)
    listener.close()
    return elapsed


def _tcp_retrans_segs() -> int:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RetransSegs")])


def test_netem_delay_on_lo_slows_every_round_trip(netem):
    baseline = _tcp_round_trips(READS)
    shown = netem("lo", "delay", "20ms")
    assert "netem" in shown and "delay 20ms" in shown, shown
    delayed = _tcp_round_trips(READS)
    # Each round trip crosses lo twice, each crossing delayed 20 ms.
    assert delayed >= READS * 2 * 0.020, f"{READS} round trips took {delayed:.3f} s with netem (baseline {baseline:.3f} s)"


def test_netem_loss_on_lo_causes_tcp_retransmits(netem):
    before = _tcp_retrans_segs()
    shown = netem("lo", "loss", "10%")
    assert "loss 10%" in shown, shown
    # ~100 packets per round: the chance that none is dropped is below 1e-4, yet one CI run
    # saw no retransmit once; the loss is random, so give it up to five rounds and let the
    # counter settle (a retransmit timer fires 200 ms+ after the drop)
    after = before
    for _ in range(5):
        _tcp_round_trips(READS)
        deadline = time.monotonic() + 1.0
        while (after := _tcp_retrans_segs()) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        if after > before:
            break
    assert after > before, "no TCP retransmit in five rounds of ~100 packets under 10% loss on lo"
    run("stallscope-netem", "lo", "off")
    assert "netem" not in run("stallscope-netem", "lo")

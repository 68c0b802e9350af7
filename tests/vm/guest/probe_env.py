"""Long-running tracers and fault set-ups shared by the ``test_probes_*`` guest tests.

Every BPF compile costs 10-35 s under software emulation, so each tracer is started
once per guest session, early (all three compile in parallel with the other guest
tests), and the tests read what it reports:

* ``vfs_tcp``: ``stallscope trace --families vfs,tcp --attach kprobe``
* ``vfs_fentry``: ``stallscope trace --families vfs --attach fentry``
* ``nfs_rdma``: ``stallscope trace --families nfs,rdma --gpu`` (each family's best method:
  kprobes where the kernel allows them) on the NVML simulator, recording to a file
  (``stallscope report`` reads it; RDMA port counters travel only in recordings)
* ``tp``: ``stallscope trace --families vfs,block --attach raw_tracepoint`` (VFS has no
  raw tracepoint method, so it gets its last, the syscall tracepoints; block its
  request-keyed raw tracepoints, the method auto picks. sched, which has only raw
  tracepoints too, gets its own tracer in test_probes_sched.py)

Each runs the real CLI (``python3 -m stallscope trace --json``) from the repository
share; a reader thread keeps its JSON events and its stderr. The NFS mounts and the
soft-RoCE pair are set up before the tracers start, since the probes attach to
functions of the nfs, sunrpc and ib_uverbs modules, which load with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from guestutil import run

REPO = Path(__file__).resolve().parents[3]
GUEST_DIR = Path(__file__).resolve().parent
SIMLIB = REPO / "sim" / "nvmlsim" / "build" / "libnvidia-ml.so.1"
MIN_LATENCY_MS = 50
READY_TIMEOUT_S = 420       # three compiles at once on two emulated CPUs
NETEM_DELAY_MS = 50         # per crossing of lo: an NFS round trip is >= 100 ms


class TracerProcess:
    """``stallscope trace --json ARGS`` in the background; its events and stderr, as they come."""

    def __init__(self, name: str, args: list[str], env: dict | None = None):
        self.name = name
        self.argv = [sys.executable, "-m", "stallscope", "trace", "--json", *args]
        self.env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), **(env or {})}
        self._events: list[dict] = []
        self._stderr: list[str] = []
        self.unparsed: list[str] = []   # stdout lines that were not one JSON event (a mixed-up write?)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    with self._lock:
                        self.unparsed.append(line[:500])
                    continue
                with self._lock:
                    self._events.append(ev)

    def _read_stderr(self):
        for line in self.proc.stderr:
            with self._lock:
                self._stderr.append(line.rstrip("\n"))
            if "stallscope: tracing" in line:
                self._ready.set()
        self._ready.set()   # exited: wake waiters

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self._stderr)

    def is_ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Whether the tracer said its probes are attached (waiting up to ``timeout_s``) and still runs."""
        self._ready.wait(timeout_s)
        return self.proc.poll() is None and "stallscope: tracing" in self.stderr

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the tracer says its probes are attached; fail the test with its stderr if not."""
        if not self.is_ready(timeout_s):
            pytest.fail(f"tracer {self.name} ({' '.join(self.argv[3:])}) did not start "
                        f"(exit {self.proc.poll()}):\n{self.stderr[-3000:]}", pytrace=False)

    def events(self, pred=lambda e: True) -> list[dict]:
        with self._lock:
            return [e for e in self._events if pred(e)]

    def wait_events(self, pred, at_least: int, timeout_s: float = 30.0, settle_s: float = 1.5) -> list[dict]:
        """Events matching ``pred`` once there are ``at_least``, plus any that arrive within ``settle_s``."""
        deadline = time.monotonic() + timeout_s
        while len(self.events(pred)) < at_least and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tracer {self.name} exited ({self.proc.returncode}):\n{self.stderr[-3000:]}",
                            pytrace=False)
            time.sleep(0.2)
        time.sleep(settle_s)
        return self.events(pred)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(5)


def pynvml_dir(tmp: Path) -> Path | None:
    """A directory holding just ``pynvml.py`` (nvidia-ml-py, one pure-Python file) from the
    repository's virtualenv on the share: Debian has no package of it, and putting the whole
    venv on the path would shadow the guest's own numpy. ``tmp`` itself (adds nothing) when
    the guest's python has pynvml of its own; None when there is none to be found."""
    import importlib.util
    if importlib.util.find_spec("pynvml") is not None:
        return tmp
    for cand in sorted(REPO.glob(".venv/lib/python3*/site-packages/pynvml.py")):
        d = tmp / "pynvml"
        d.mkdir(exist_ok=True)
        link = d / "pynvml.py"
        if not link.exists():
            link.symlink_to(cand)
        return d
    return None


def summary(events: list, limit: int = 60) -> str:
    """One line per event (for assertion messages): type, op, path/device, latency, pid."""
    lines = [f"{e['type']} {e['op']} {e.get('path', e.get('device', ''))} {e['dur_ns'] / 1e6:.1f} ms "
             f"pid {e['pid']} {e.get('comm', '')}" for e in events[-limit:]]
    return "\n".join(lines) or "(none)"


def recording_rows(path: Path, kind: str) -> list:
    """Every row of table ``kind`` in a recording, as dicts of plain values, in batch order."""
    from stallscope.wire.recording import read_recording

    out = []
    for batch in read_recording(str(path)):
        t = batch.tables.get(kind)
        if t is None:
            continue
        cols = list(t)
        for vals in zip(*(t[c] for c in cols)):
            out.append({c: (v.item() if hasattr(v, "item") else v) for c, v in zip(cols, vals)})
    return out


# ---------------------------------------------------------------------------- soft-RoCE pair


@dataclass(frozen=True)
class RxePair:
    """Two soft-RoCE devices on the two ends of a veth pair, talking over the wire.

    Both addresses are local, so normally the kernel would route between them over lo and
    rdma_rxe would loop the packets back internally (netem on the netdev would never see
    them). Policy routing sends locally generated packets from one address to the other out
    of the veth instead (``ip rule ... iif lo ... lookup 100``, the local table moved after
    it, accept_local on), so RoCE packets really cross ``ssveth0``/``ssveth1`` and a netem
    qdisc there delays or drops them: retries, sequence errors and slow completions.
    """

    devices: tuple      # ("ssrxe_a", "ssrxe_b")
    netdevs: tuple      # ("ssveth0", "ssveth1")
    addrs: tuple        # ("198.51.100.1", "198.51.100.2")
    gid_index: tuple    # index of each device's IPv4-mapped GID


def _gid_index(dev: str, addr: str) -> int | None:
    want = "0000:0000:0000:0000:0000:ffff:" + "".join(f"{int(x):02x}" for x in addr.split(".")[:2]) + ":" + \
           "".join(f"{int(x):02x}" for x in addr.split(".")[2:])
    gids = Path(f"/sys/class/infiniband/{dev}/ports/1/gids")
    for n in range(16):   # the table has hundreds of entries; ours are among the first
        try:
            if (gids / str(n)).read_text().strip() == want:
                return n
        except OSError:
            continue
    return None


def rxe_pair_up() -> RxePair:
    devs, nds, addrs = ("ssrxe_a", "ssrxe_b"), ("ssveth0", "ssveth1"), ("198.51.100.1", "198.51.100.2")
    sysctls = [f"net.ipv4.conf.{d}.{k}={v}" for d in ("all", *nds) for k, v in (("accept_local", 1), ("rp_filter", 0))]
    script = f"""set -e
modprobe rdma_rxe
modprobe ib_uverbs
ip link add {nds[0]} type veth peer name {nds[1]}
ip addr add {addrs[0]}/24 dev {nds[0]}
ip addr add {addrs[1]}/24 dev {nds[1]}
ip link set {nds[0]} up
ip link set {nds[1]} up
sysctl -qw {' '.join(sysctls)}
ip rule add pref 10 iif lo from {addrs[0]} to {addrs[1]} lookup 100
ip rule add pref 11 iif lo from {addrs[1]} to {addrs[0]} lookup 101
ip route add {addrs[1]} dev {nds[0]} src {addrs[0]} table 100
ip route add {addrs[0]} dev {nds[1]} src {addrs[1]} table 101
ip rule add pref 100 lookup local
ip rule del pref 0
rdma link add {devs[0]} type rxe netdev {nds[0]}
rdma link add {devs[1]} type rxe netdev {nds[1]}
"""
    run("sh", "-c", script)
    idx = [None, None]
    for _ in range(50):   # the IPv4 GIDs appear once the address events reach rdma_rxe
        idx = [_gid_index(d, a) for d, a in zip(devs, addrs)]
        if None not in idx:
            break
        time.sleep(0.1)
    if None in idx:
        pytest.fail(f"soft-RoCE pair has no IPv4 GIDs ({idx})", pytrace=False)
    return RxePair(devs, nds, addrs, tuple(idx))


def rxe_pair_down(p: RxePair) -> None:
    script = f"""
for d in {' '.join(p.devices)}; do rdma link delete $d 2>/dev/null; done
ip link delete {p.netdevs[0]} 2>/dev/null
ip rule add pref 0 lookup local 2>/dev/null
ip rule del pref 100 2>/dev/null
ip rule del pref 10 2>/dev/null
ip rule del pref 11 2>/dev/null
true
"""
    subprocess.run(["sh", "-c", script], capture_output=True, timeout=60)


def hw_counters(dev: str) -> dict:
    d = Path(f"/sys/class/infiniband/{dev}/ports/1/hw_counters")
    return {f"hw_counters/{p.name}": int(p.read_text().split()[0]) for p in d.iterdir() if p.name != "lifespan"}


# ---------------------------------------------------------------------------- tracers


@dataclass
class ProbeTracers:
    vfs_tcp: TracerProcess
    vfs_fentry: TracerProcess
    nfs_rdma: TracerProcess
    recording: Path
    sim_state: Path
    gpu: bool               # nfs_rdma samples the simulated GPU
    gpu_reason: str
    rxe: RxePair
    mounts: dict

    tp: TracerProcess
    tp_recording: Path      # tp's batches: the block family's counters when a request is missed

    def all(self):
        return (self.vfs_tcp, self.vfs_fentry, self.nfs_rdma, self.tp)


def _unloadable(lib: Path) -> str:
    """Why ``lib`` cannot be loaded in this guest ("" if it can): the NVML simulator is built on
    the host, against its glibc (2.36), newer than Debian 11's 2.31."""
    import ctypes
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return str(e)
    return ""


def start_probe_tracers(tmp: Path, mounts: dict, rxe: RxePair) -> ProbeTracers:
    from stallscope.sim import nvmlsim

    state = Path(nvmlsim.create_state(str(tmp / "sim.state"), n_gpus=1, period_ms=100))
    rec = tmp / "nfs_rdma.ssrec"
    common = ["--min-latency-ms", str(MIN_LATENCY_MS)]
    gpu_args, env, reason = ["--no-gpu"], {}, ""
    pyn = pynvml_dir(tmp)
    if not SIMLIB.exists():
        reason = f"{SIMLIB} missing (built on the host by .ci/setup.sh)"
    elif _unloadable(SIMLIB):
        reason = f"{SIMLIB} (built on the host) does not load here: {_unloadable(SIMLIB)}"
    elif pyn is None:
        reason = "pynvml.py not found in the repository's .venv (pip package nvidia-ml-py)"
    else:
        gpu_args = ["--gpu", "--nvml-lib", str(SIMLIB)]
        env = {"STALLSCOPE_NVMLSIM_STATE": str(state), "PYTHONPATH": f"{os.environ.get('PYTHONPATH', REPO)}:{pyn}"}
    return ProbeTracers(
        vfs_tcp=TracerProcess("vfs_tcp", ["--families", "vfs,tcp", "--attach", "kprobe", "--no-gpu", *common]),
        vfs_fentry=TracerProcess("vfs_fentry", ["--families", "vfs", "--attach", "fentry", "--no-gpu", *common]),
        nfs_rdma=TracerProcess("nfs_rdma", ["--families", "nfs,rdma", "--output", str(rec),
                                            *gpu_args, *common], env=env),
        recording=rec, sim_state=state, gpu=not reason, gpu_reason=reason, rxe=rxe, mounts=mounts,
        tp=TracerProcess("tp", ["--families", "vfs,block", "--attach", "raw_tracepoint", "--no-gpu",
                                "--output", str(tmp / "tp.ssrec"), *common]),
        tp_recording=tmp / "tp.ssrec")


# ---------------------------------------------------------------------------- NFS workload


@dataclass
class NfsLoad:
    """One nfsload.py run: its process and the calls it timed."""

    version: str
    pid: int
    tid: int
    comm: str
    ops: list
    directory: str

    def calls(self, op: str) -> list:
        return [o for o in self.ops if o["op"] == op]


LOAD_COUNT = 7


def run_nfs_load(version: str, mount: Path, xfer: bool = False) -> NfsLoad:
    """Create the files server-side, then run nfsload.py on the mount under netem delay on lo
    (with ``xfer``: its sendfile/splice/copy_file_range/io_uring calls, in their own directory)."""
    from nfsload import XFER_FILES, XFER_SPACING

    sub = f"{'xfer' if xfer else 'load'}{version}"
    server_dir = Path("/srv/nfs") / sub
    server_dir.mkdir(exist_ok=True)
    filled, empty = (XFER_FILES, ("cout",)) if xfer else (("data", "rdata", "vdata"), ("out", "wout", "vout", "meta", "opn"))
    for name in filled:
        (server_dir / name).write_bytes(os.urandom((XFER_SPACING if xfer else 4096) * LOAD_COUNT))
    for name in empty:
        (server_dir / name).write_bytes(b"")
    directory = str(mount / sub)
    args = ["--xfer"] if xfer else ["--opens"] if version != "3" else []
    run("stallscope-netem", "lo", "delay", f"{NETEM_DELAY_MS}ms")
    try:
        out = run(sys.executable, str(GUEST_DIR / "nfsload.py"), directory, str(LOAD_COUNT), *args, timeout=300)
    finally:
        run("stallscope-netem", "lo", "off")
    r = json.loads(out)
    return NfsLoad(version, r["pid"], r["tid"], r["comm"], r["ops"], directory)


# ---------------------------------------------------------------------------- what a kernel lacks


def tracefs() -> Path:
    return Path("/sys/kernel/tracing") if Path("/sys/kernel/tracing/events").is_dir() \
        else Path("/sys/kernel/debug/tracing")


def kernel_lacks(family: str, stderr: str, needs: dict) -> str | None:
    """If the tracer did not load ``family``, its reason, once checked against this kernel.

    ``needs`` maps a fact the family needs to a check that is True when the kernel has it
    (e.g. ``{"module BTF for sunrpc": lambda: Path("/sys/kernel/btf/sunrpc").exists()}``).
    Returns None when the family loaded. When it did not, the test fails unless one of the
    facts is false on this kernel: only a verified kernel limitation is "unavailable";
    anything else is a failure with the tracer's reason."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"stallscope: {family}: ")]
    if lines and not lines[-1].startswith(f"stallscope: {family}: not loaded"):
        return None
    reason = lines[-1].split(": ", 2)[-1] if lines else "(the tracer said nothing about it)"
    lacking = [fact for fact, has in needs.items() if not has()]
    if not lacking:
        pytest.fail(f"{family} did not load although this kernel has {', '.join(needs)}: {reason}", pytrace=False)
    return f"kernel lacks {'; '.join(lacking)} ({family}: {reason})"[:400]


def has_module_btf(module: str) -> bool:
    """Module BTF (CONFIG_DEBUG_INFO_BTF_MODULES, Linux 5.11+) of a loaded module."""
    return Path(f"/sys/kernel/btf/{module}").exists() or not Path(f"/sys/module/{module}").exists()


def has_tracepoint(tp: str) -> bool:
    return (tracefs() / "events" / tp).is_dir()


NFS_NEEDS = {"tracepoint sunrpc:xprt_retransmit (5.11+)": lambda: has_tracepoint("sunrpc/xprt_retransmit"),
             "module BTF of nfs and sunrpc (5.11+)": lambda: has_module_btf("nfs") and has_module_btf("sunrpc")}
RDMA_KPROBE_NEEDS = {"module BTF of ib_uverbs and ib_core (5.11+)":
                     lambda: has_module_btf("ib_uverbs") and has_module_btf("ib_core")}
TCP_NEEDS = {"tracepoints tcp:tcp_retransmit_skb, tcp:tcp_retransmit_synack, sock:inet_sock_set_state":
             lambda: all(has_tracepoint(tp) for tp in ("tcp/tcp_retransmit_skb", "tcp/tcp_retransmit_synack",
                                                       "sock/inet_sock_set_state"))}

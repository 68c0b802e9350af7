"""The tracer's options, written once: defaults come from the domain objects
(``ProbeConfig``, ``AgentConfig``) and feed the CLI, the probe config and the BPF
``-D`` flags alike; ``TraceOptions`` is what the commands build an agent from."""

from __future__ import annotations

import dataclasses
import functools
import os

import click

from stallscope.tracer import probes
from stallscope.tracer.agent import AgentConfig
from stallscope.tracer.families import ALL_FAMILIES, DEFAULT_FAMILIES

_PROBE = probes.ProbeConfig()
DEFAULT_MIN_LATENCY_MS = _PROBE.min_latency_ns / 1e6
DEFAULT_RINGBUF_MB = _PROBE.ringbuf_pages * 4096 >> 20
DEFAULT_STORE = "/var/lib/stallscope/store.db"
DEFAULT_BIND = "tcp://0.0.0.0:5557"


@dataclasses.dataclass
class TraceOptions:
    """The options every tracing command shares (trace, watch, demo)."""
    min_latency_ms: float = DEFAULT_MIN_LATENCY_MS
    pid: int | None = None
    cgroup: str | None = None
    families: str = ",".join(DEFAULT_FAMILIES)
    attach: str = "auto"
    node: str | None = None
    gpu: bool | None = None
    nvml_lib: str | None = None
    ringbuf_mb: int = DEFAULT_RINGBUF_MB

    def agent_config(self) -> AgentConfig:
        pages = 1
        while pages * 4096 < self.ringbuf_mb << 20:
            pages <<= 1
        pc = probes.ProbeConfig(min_latency_ns=int(self.min_latency_ms * 1e6), pid=self.pid or 0,
                                cgroup_id=_cgroup_id(self.cgroup) if self.cgroup else 0,
                                families=_families(self.families), attach=self.attach,
                                ringbuf_pages=pages)
        cfg = AgentConfig(probe=pc, gpu={None: "auto", True: "on", False: "off"}[self.gpu],
                          nvml_lib=self.nvml_lib)
        if self.node:
            cfg.node = self.node
        return cfg


_TRACE_FIELDS = [f.name for f in dataclasses.fields(TraceOptions)]


def _cgroup_id(path: str) -> int:
    """cgroup v2 id (the directory's inode number) of a path, absolute or under /sys/fs/cgroup."""
    p = path if os.path.isdir(path) else os.path.join("/sys/fs/cgroup", path.lstrip("/"))
    try:
        return os.stat(p).st_ino
    except OSError as e:
        raise click.BadParameter(f"cgroup {p}: {e.strerror}", param_hint="--cgroup")


def _families(value: str) -> tuple:
    fams = tuple(f.strip() for f in value.split(",") if f.strip())
    bad = [f for f in fams if f not in ALL_FAMILIES]
    if bad:
        raise click.BadParameter(f"unknown probe family {bad[0]!r} (choose from "
                                 f"{', '.join(ALL_FAMILIES)})", param_hint="--families")
    return fams


def trace_options(f):
    """The shared tracing options; the command receives them as one ``TraceOptions``
    in its ``topts`` argument."""
    d = TraceOptions()
    opts = [
        click.option("--min-latency-ms", type=click.FloatRange(min=0), default=d.min_latency_ms,
                     show_default=True, help="Report ops at least this slow; faster ones only feed histograms."),
        click.option("--pid", type=click.IntRange(min=1), default=None, help="Trace only this process (tgid)."),
        click.option("--cgroup", default=None, help="Trace only this cgroup v2 (a path, or relative to /sys/fs/cgroup)."),
        click.option("--families", default=d.families, show_default=True, help="Probe families to load."),
        click.option("--attach", type=click.Choice(probes.ATTACH_CHOICES), default=d.attach, show_default=True,
                     help="Force an attach method (auto picks the best the kernel offers)."),
        click.option("--node", default=None, help="Node name in events [default: hostname]."),
        click.option("--gpu/--no-gpu", "gpu", default=None, help="Require / skip NVML sampling [default: if present]."),
        click.option("--nvml-lib", default=None, type=click.Path(dir_okay=False),
                     help="libnvidia-ml.so.1 to load (e.g. the simulator) [env STALLSCOPE_NVML_LIB]."),
        click.option("--ringbuf-mb", type=click.IntRange(min=1), default=d.ringbuf_mb, show_default=True,
                     help="Ring buffer size per probe family (rounded to a power of 2)."),
    ]
    for o in reversed(opts):
        f = o(f)

    def wrapper(**kw):
        topts = TraceOptions(**{k: kw.pop(k) for k in _TRACE_FIELDS})
        return f(topts=topts, **kw)
    return functools.update_wrapper(wrapper, f)


@dataclasses.dataclass
class SecurityOptions:
    """The key options of one command, as given (see `stallscope keys --help`);
    ``security()`` checks them and loads the keys. role 'server' is `collect`
    (``peer_key`` is --upstream-key), 'client' is a tracer (``peer_key`` is
    --collector-key)."""
    role: str
    keys_dir: str | None = None
    secret_key: str | None = None
    allow_dir: str | None = None
    peer_key: str | None = None
    insecure: bool = False

    def security(self, log=None):
        """A ``stallscope.wire.auth.Security``; a one-line UsageError when the options
        contradict each other or a key file is missing or malformed."""
        from stallscope.wire.auth import Security, SecurityError
        try:
            return Security.from_options(self.role, keys_dir=self.keys_dir, secret_key=self.secret_key,
                                         allow_dir=self.allow_dir, peer_key=self.peer_key,
                                         insecure=self.insecure, log=log)
        except SecurityError as e:
            raise click.UsageError(str(e)) from None


_PATH = click.Path(dir_okay=False)
_DIR = click.Path(file_okay=False)


def security_options(role: str):
    """The key options of `collect` (role 'server') or of a tracing command (role
    'client'); the command receives them as one ``SecurityOptions`` in ``sopts``.
    Plaintext stays allowed on loopback without them."""
    if role not in ("server", "client"):
        raise ValueError(role)
    server = role == "server"
    own = "collector" if server else "tracer"
    opts = [
        click.option("--keys-dir", type=_DIR, default=None, envvar="STALLSCOPE_KEYS_DIR",
                     help=(f"Key folder: {own}.key_secret, "
                           + ("allowed/ (the tracers' public keys)" if server else "collector.key")
                           + " [env STALLSCOPE_KEYS_DIR]. Encrypts and authenticates the stream.")),
        click.option("--secret-key", type=_PATH, default=None,
                     help=f"This side's keypair (.key_secret) [default: KEYS_DIR/{own}.key_secret]."),
    ]
    if server:
        opts += [
            click.option("--allow-dir", type=_DIR, default=None,
                         help="Folder of tracer public keys allowed in [default: KEYS_DIR/allowed]."),
            click.option("--upstream-key", "peer_key", type=_PATH, default=None,
                         help="The upstream collector's public key (.key), for --upstream."),
        ]
    else:
        opts.append(click.option("--collector-key", "peer_key", type=_PATH, default=None,
                                 help="The collector's public key (.key; a name inside --keys-dir works) "
                                      "[default: KEYS_DIR/collector.key]."))
    opts.append(click.option("--insecure", is_flag=True,
                             help="Allow plaintext off loopback (no keys: anyone can send or read)."))
    fields = ["keys_dir", "secret_key", "peer_key", "insecure"] + (["allow_dir"] if server else [])

    def decorate(f):
        for o in reversed(opts):
            f = o(f)

        def wrapper(**kw):
            sopts = SecurityOptions(role, **{k: kw.pop(k) for k in fields})
            return f(sopts=sopts, **kw)
        return functools.update_wrapper(wrapper, f)
    return decorate

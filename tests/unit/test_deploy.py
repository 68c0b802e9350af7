"""The deployment files: systemd units checked by `systemd-analyze verify`, Kubernetes
manifests by kubernetes-validate's offline schemas, the Slurm prolog/epilog run with a fake
Slurm environment; and the GPU -> pod/job mapping reaching the verdicts.

Each checker is also shown a broken copy, which it must reject."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stallscope.analysis.analyze import analyze
from stallscope.tracer.attribution import GpuAttribution, read_job_mapping
from stallscope.wire.schema import Batch

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SHIPPED_EXEC = "/usr/local/bin/stallscope"
K8S_VERSION = "1.35.0"
CAPS = ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"]


def _tool(name):
    """A tool CI installs: missing fails the test under STALLSCOPE_REQUIRE_BPF=1, else skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("STALLSCOPE_REQUIRE_BPF") == "1":
            pytest.fail(f"{name} is required (CI installs it) but not found")
        pytest.skip(f"{name} not installed")
    return path


def _stallscope_bin():
    for cand in (os.path.join(os.path.dirname(sys.executable), "stallscope"), shutil.which("stallscope")):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.fail("the stallscope command is not installed (pip install -e .)")


# ------------------------------------------------------------------ systemd
def _unit_keys(text):
    """[(section, key, value)] of a unit file."""
    out, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.append((section, k.strip(), v.strip()))
    return out


def verify_unit(text: str, name: str, tmp_path) -> str:
    """Problems `systemd-analyze verify` finds in a unit (its whole output: it exits 0 on
    unknown keys and unparsable values, only warning), plus capability names it does not
    know (it ignores those silently); "" when clean."""
    sa = _tool("systemd-analyze")
    d = tmp_path / f"verify-{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / name).write_text(text)
    r = subprocess.run([sa, "verify", str(d / name)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    problems = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and not problems:
        problems = f"systemd-analyze verify exited {r.returncode}"
    known = set(subprocess.run([sa, "capability"], capture_output=True, text=True, timeout=60).stdout.split())
    for _s, k, v in _unit_keys(text):
        if k in ("CapabilityBoundingSet", "AmbientCapabilities"):
            for cap in v.lstrip("~").split():
                if cap.lower() not in known:
                    problems += f"\nunknown capability {cap} in {k}"
    return problems.strip()


def _installed_copy(name):
    """The shipped unit with ExecStart pointing at the installed command (verify checks the
    binary exists); asserts nothing else differs."""
    shipped = (DEPLOY / "systemd" / name).read_text()
    exe = _stallscope_bin()
    copy = "".join(ln.replace(SHIPPED_EXEC, exe, 1) if ln.startswith("ExecStart=") else ln
                   for ln in shipped.splitlines(keepends=True))
    changed = [(a, b) for a, b in zip(shipped.splitlines(), copy.splitlines()) if a != b]
    assert changed and all(a.startswith("ExecStart=") for a, _b in changed), changed
    return copy


UNITS = ["stallscope-tracer.service", "stallscope-collector.service"]


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_clean(name, tmp_path):
    assert verify_unit(_installed_copy(name), name, tmp_path) == ""


BREAKAGES = [
    ("s/^Type=notify$/Type=notifyy/", "Failed to parse service type"),
    ("s/^Restart=on-failure$/Restart=sometimes/", "restart specifier"),
    ("s/^ProtectSystem=strict$/ProtectSytem=strict/", "Unknown key"),
    ("s/^(CapabilityBoundingSet=.*)CAP_PERFMON/\\1CAP_PERFMONN/", "unknown capability CAP_PERFMONN"),
    ("s/^\\[Service\\]$/[Servce]/", "Unknown section"),
    ("s#^ExecStart=\\S+#ExecStart=/nonexistent/stallscope#", "not executable"),
]


@pytest.mark.parametrize("edit,why", BREAKAGES, ids=[e for e, _ in BREAKAGES])
def test_a_broken_unit_is_rejected(edit, why, tmp_path):
    _s, pat, rep, _e = edit.split(edit[1])
    good = _installed_copy("stallscope-tracer.service")
    bad = re.sub(pat, rep, good, count=1, flags=re.M)
    assert bad != good, edit
    problems = verify_unit(bad, "stallscope-tracer.service", tmp_path)
    assert why in problems, problems


def test_tracer_unit_contract():
    keys = _unit_keys((DEPLOY / "systemd" / "stallscope-tracer.service").read_text())
    svc = {k: v for s, k, v in keys if s == "Service"}
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    assert svc["CapabilityBoundingSet"].split() == CAPS and svc["AmbientCapabilities"].split() == CAPS
    assert svc["ExecStart"].startswith(SHIPPED_EXEC + " trace ")
    # sandboxing that would break BPF stays off
    for k in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectClock", "PrivateDevices", "SystemCallFilter"):
        assert k not in svc, k


def test_collector_unit_is_unprivileged(tmp_path):
    keys = _unit_keys((DEPLOY / "systemd" / "stallscope-collector.service").read_text())
    svc = {k: v for s, k, v in keys if s == "Service"}
    assert svc["DynamicUser"] == "yes" and svc["StateDirectory"] == "stallscope"
    assert svc["CapabilityBoundingSet"] == "" and svc["AmbientCapabilities"] == ""
    assert "--store ${STATE_DIRECTORY}/store.db" in svc["ExecStart"]
    sa = _tool("systemd-analyze")
    p = tmp_path / "stallscope-collector.service"
    p.write_text(_installed_copy("stallscope-collector.service"))
    r = subprocess.run([sa, "security", "--offline=true", str(p)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout[-2000:]


def test_env_file_names_what_the_units_read():
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "stallscope.env").read_text().splitlines()
               if line and not line.startswith("#"))
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        used = set(re.findall(r"\$\{?(STALLSCOPE_[A-Z_]+)", text))
        assert used <= set(env), used - set(env)
        assert "EnvironmentFile=-/etc/default/stallscope" in text
    assert env["STALLSCOPE_JOB_MAPPING_DIR"] == "/var/lib/dcgm-exporter/job-mapping"


# ------------------------------------------------------------------ Kubernetes
def _k8s_docs():
    docs = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _validate(doc):
    import kubernetes_validate
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("fname,doc", _k8s_docs(), ids=[f"{f}:{d['kind']}" for f, d in _k8s_docs()])
def test_manifest_validates(fname, doc):
    _validate(doc)


def _daemonset():
    return next(d for _f, d in _k8s_docs() if d["kind"] == "DaemonSet")


def test_tracer_daemonset_contract():
    ds = _daemonset()
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert spec["hostPID"] is True
    assert sorted(c["securityContext"]["capabilities"]["add"]) == sorted(x[4:] for x in CAPS)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf", "/sys/fs/bpf", "/lib/modules", "/usr/src",
                 "/var/lib/kubelet/pod-resources"):
        assert path in mounts, path
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    args = c["args"]
    assert args[args.index("--node") + 1] == "$(NODE_NAME)"
    svc = next(d for _f, d in _k8s_docs() if d["kind"] == "Service")
    endpoint = args[args.index("--collector") + 1]
    assert endpoint == f"tcp://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"


def test_the_cli_accepts_the_daemonset_and_unit_arguments():
    """The arguments the manifests and units pass are options `stallscope trace` has."""
    from click.testing import CliRunner

    from stallscope.main import cli
    c = _daemonset()["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("$(NODE_NAME)", "node-1") for a in c["args"]]
    r = CliRunner().invoke(cli, ["trace", *args, "--dump-bpf", "vfs"])
    assert r.exit_code == 0, r.output


MUTATIONS = [
    ("hostPID as a string", lambda d: d["spec"]["template"]["spec"].__setitem__("hostPID", "yes")),
    ("unknown field", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("privileges", True)),
    ("no selector", lambda d: d["spec"].pop("selector")),
    ("volume without source type", lambda d: d["spec"]["template"]["spec"]["volumes"][0].__setitem__("hostPath", "/sys")),
]


@pytest.mark.parametrize("what,mutate", MUTATIONS, ids=[m for m, _ in MUTATIONS])
def test_an_invalid_manifest_is_rejected(what, mutate):
    import kubernetes_validate
    ds = _daemonset()
    mutate(ds)
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(ds)


# ------------------------------------------------------------------ Slurm
PROLOG, EPILOG = DEPLOY / "slurm" / "prolog.sh", DEPLOY / "slurm" / "epilog.sh"


def _slurm(script, job_dir, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_", "GPU_DEVICE"))}
    return subprocess.Popen(["bash", str(script)], env={**base, "STALLSCOPE_JOB_MAPPING_DIR": str(job_dir), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(script, job_dir, **env):
    p = _slurm(script, job_dir, **env)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return err


def _files(d):
    return {f.name: f.read_text() for f in sorted(Path(d).iterdir())}


def test_two_concurrent_jobs_then_one_ends(tmp_path):
    jm = tmp_path / "job-mapping"
    a = _slurm(PROLOG, jm, SLURM_JOB_ID="101", SLURM_JOB_GPUS="0,1")
    b = _slurm(PROLOG, jm, SLURM_JOB_ID="102", SLURM_JOB_GPUS="2-3")
    for p in (a, b):
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert _files(jm) == {"0": "101\n", "1": "101\n", "2": "102\n", "3": "102\n"}
    assert read_job_mapping(str(jm)) == ({"0": ["101"], "1": ["101"], "2": ["102"], "3": ["102"]}, 0)
    _run(EPILOG, jm, SLURM_JOB_ID="101")
    assert _files(jm) == {"2": "102\n", "3": "102\n"}
    assert read_job_mapping(str(jm)) == ({"2": ["102"], "3": ["102"]}, 0)
    attr = GpuAttribution([{"index": i, "uuid": f"GPU-{i}"} for i in range(4)], str(tmp_path / "none.sock"),
                          str(jm), refresh_s=0)
    attr.refresh()
    assert [attr.for_gpu(i) for i in range(4)] == [{}, {}, {"jobs": ["102"]}, {"jobs": ["102"]}]


def test_many_jobs_sharing_a_gpu_lose_no_write(tmp_path):
    """Prologs of jobs sharing GPU 0 run at once; the directory lock keeps every job id."""
    jm = tmp_path / "jm"
    procs = [_slurm(PROLOG, jm, SLURM_JOB_ID=str(500 + i), SLURM_STEP_GPUS="0") for i in range(23)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert sorted((jm / "0").read_text().split()) == [str(500 + i) for i in range(23)]
    procs = [_slurm(EPILOG, jm, SLURM_JOB_ID=str(500 + i)) for i in range(0, 23, 2)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert sorted((jm / "0").read_text().split()) == [str(500 + i) for i in range(1, 23, 2)]
    assert [f.name for f in jm.iterdir()] == ["0"]          # no temp or lock files left


def test_gpu_sources_and_uuids(tmp_path):
    """SLURM_JOB_GPUS first, then SLURM_STEP_GPUS, CUDA_VISIBLE_DEVICES; UUIDs through
    nvidia-smi; entries that name no GPU are one line on stderr and the prolog still exits 0."""
    jm = tmp_path / "jm"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    smi = bin_ / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0, GPU-aaaa\\n1, GPU-bbbb\\n5, GPU-cccc\\n'\n")
    smi.chmod(0o755)
    path = f"{bin_}:{os.environ['PATH']}"
    _run(PROLOG, jm, SLURM_JOB_ID="7", SLURM_JOB_GPUS="3", CUDA_VISIBLE_DEVICES="0", PATH=path)
    err = _run(PROLOG, jm, SLURM_JOB_ID="8", CUDA_VISIBLE_DEVICES="GPU-cccc,NoDevFiles,GPU-zzzz", PATH=path)
    assert _files(jm) == {"3": "7\n", "5": "8\n"}
    assert "'NoDevFiles'" in err and "'GPU-zzzz'" in err and len(err.strip().splitlines()) == 2
    assert _run(PROLOG, jm, SLURM_JOB_ID="9") == ""                  # no GPUs: nothing, silently
    assert "not a job id" in _run(PROLOG, jm, SLURM_JOB_GPUS="0")
    assert _files(jm) == {"3": "7\n", "5": "8\n"}


def test_dcgm_job_map_placeholder_and_unwritable_dir(tmp_path):
    """Files that `dcgm-job-map -init` made hold 0 (no job): the prolog replaces it, the reader
    ignores it. A directory that cannot be made is reported, and the job still runs."""
    jm = tmp_path / "jm"
    jm.mkdir()
    (jm / "0").write_text("0\n")
    (jm / "1").write_text("0\n")
    _run(PROLOG, jm, SLURM_JOB_ID="42", SLURM_JOB_GPUS="0")
    assert _files(jm) == {"0": "42\n", "1": "0\n"}
    assert read_job_mapping(str(jm))[0] == {"0": ["42"]}
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot create" in _run(PROLOG, blocker / "jm", SLURM_JOB_ID="42", SLURM_JOB_GPUS="0")
    assert read_job_mapping(str(tmp_path / "absent")) == (None, 0)


# ------------------------------------------------------------------ verdicts
S = 1_000_000_000


def _batch(node, seq, t0, gpu_entries, utils, pid=4242, proc=None, sent_ns=None):
    """A GPU at 200 ms samples: busy, then idle for ``utils`` zeros, then busy."""
    ts = t0 + np.arange(len(utils), dtype=np.int64) * (S // 5)
    tables = {"gpu": {"ts_ns": ts.astype(np.uint64), "gpu": np.zeros(len(ts), np.uint64),
                      "util": np.array(utils, np.uint64), "synth": np.zeros(len(ts), np.uint64)},
              "gpu_proc": {"ts_ns": ts.astype(np.uint64), "gpu": np.zeros(len(ts), np.uint64),
                           "pid": np.full(len(ts), pid, np.uint64)}}
    if proc:
        tables["proc"] = {k: np.array([v], dtype=object if isinstance(v, str) else np.int64) for k, v in proc.items()}
    meta = {"gpu": {"gpus": gpu_entries, "sample_period_ns": {0: S // 5}},
            "clock": {"sent_ns": int(ts[-1]) + S // 10 if sent_ns is None else sent_ns}}
    return Batch(node, seq, tables, {}, {}, meta)


UTILS = [90] * 5 + [0] * 6 + [90] * 5


def test_verdicts_carry_pod_container_and_job_when_known():
    t0 = time.time_ns() - 100 * S
    g = {"index": 0, "uuid": "GPU-0", "name": "H200",
         "pods": [{"namespace": "ml", "pod": "llama-train-0", "container": "trainer"}], "jobs": ["3141"]}
    proc = {"pid": 4242, "ppid": 1, "comm": "python", "start_ns": t0 - S, "job": "", "rank": 0,
            "pod_uid": "0c6d3a7e-5f2b-4d1a-9e8c-7b6a5f4e3d2c", "container_id": "ab" * 32}
    res = analyze([_batch("n1", 0, t0, [g], UTILS, proc=proc)])
    assert len(res.verdicts) == 1
    j = res.verdicts[0].to_json()
    assert (j["namespace"], j["pod"], j["container"]) == ("ml", "llama-train-0", "trainer")
    assert (j["pod_uid"], j["container_id"], j["job"]) == (proc["pod_uid"], proc["container_id"], "3141")


def test_fields_absent_when_unknown_and_env_job_wins():
    t0 = time.time_ns() - 100 * S
    shared = {"index": 0, "uuid": "GPU-0", "name": "H200", "jobs": ["1", "2"],
              "pods": [{"namespace": "a", "pod": "p", "container": "c"}, {"namespace": "b", "pod": "q", "container": "c"}]}
    res = analyze([_batch("n1", 0, t0, [shared], UTILS)])
    j = res.verdicts[0].to_json()
    for k in ("namespace", "pod", "container", "pod_uid", "container_id"):
        assert k not in j, k            # shared GPU, no cgroup facts: nothing claimed
    assert j["job"] == ""               # two jobs on the GPU: none claimed
    proc = {"pid": 4242, "ppid": 1, "comm": "python", "start_ns": t0 - S, "job": "env-job", "rank": 1}
    one = dict(shared, jobs=["3141"])
    res = analyze([_batch("n1", 0, t0, [one], UTILS, proc=proc)])
    assert res.verdicts[0].job == "env-job"       # the process's own environment first


def test_holders_are_looked_up_at_the_interval_time():
    """A GPU handed from one job to the next: each interval takes the job mapped then."""
    t0 = time.time_ns() - 100 * S
    b0 = _batch("n1", 0, t0, [{"index": 0, "uuid": "GPU-0", "jobs": ["100"]}], UTILS)
    # the next job's mapping arrives (a heartbeat batch) before its samples show the idle
    b1 = _batch("n1", 1, t0 + 16 * S // 5, [{"index": 0, "uuid": "GPU-0", "jobs": ["200"]}], UTILS,
                sent_ns=t0 + 33 * S // 10)
    res = analyze([b1, b0])
    assert [v.job for v in sorted(res.verdicts, key=lambda v: v.idle_start_ns)] == ["100", "200"]


def test_tracer_batch_to_verdict_through_the_codec(tmp_path):
    """The agent's batch (GPU meta annotated from a real pod-resources server and a job
    mapping written by the prolog; proc rows with the owner's cgroup), encoded and decoded,
    gives a verdict naming the pod, container and job."""
    from stallscope.tracer.agent import Agent, AgentConfig
    from stallscope.wire import codec
    from tests.unit.test_podresources import GPU0, GPUS, Kubelet

    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "stat").write_text("cpu 0\nbtime 1700000000\n")
    (proc / "4242" / "stat").write_text("4242 (python) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0\n")
    (proc / "4242" / "environ").write_bytes(b"RANK=0\0")
    scope = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0c6d3a7e_5f2b_4d1a_9e8c_7b6a5f4e3d2c.slice/" \
            f"cri-containerd-{'cd' * 32}.scope"
    (proc / "4242" / "cgroup").write_text(f"0::{scope}\n")
    jm = tmp_path / "jm"
    _run(PROLOG, jm, SLURM_JOB_ID="3141", SLURM_JOB_GPUS="0")
    sock = str(tmp_path / "kubelet.sock")
    kubelet = Kubelet(sock)

    class Sampler:                                  # what GpuSampler.meta() gives
        gpus = GPUS

        def meta(self):
            return {"gpus": list(GPUS), "sample_period_ns": {0: S // 5}, "errors": 0, "source": "samples"}

    try:
        agent = Agent(AgentConfig(proc_root=str(proc), node="n1", pod_resources_socket=sock,
                                  job_mapping_dir=str(jm)), [], log=lambda m: None)
        agent.gpu = Sampler()
        agent.attribution = GpuAttribution(GPUS, sock, str(jm), log=lambda m: None)
        t0 = time.time_ns() - 10 * S
        raw = _batch("n1", 0, t0, [], UTILS)
        agent.pending = [{k: raw.tables[k] for k in ("gpu", "gpu_proc")}]
        b = codec.decode(codec.encode(agent.build_batch()))
    finally:
        kubelet.stop()
    g0 = b.meta["gpu"]["gpus"][0]
    assert g0["uuid"] == GPU0 and g0["jobs"] == ["3141"]
    assert g0["pods"] == [{"namespace": "ml", "pod": "llama-train-0", "container": "trainer"}]
    assert list(b.tables["proc"]["container_id"]) == ["cd" * 32]
    j = analyze([b]).verdicts[0].to_json()
    assert (j["namespace"], j["pod"], j["container"], j["job"]) == ("ml", "llama-train-0", "trainer", "3141")
    assert j["pod_uid"] == "0c6d3a7e-5f2b-4d1a-9e8c-7b6a5f4e3d2c" and j["container_id"] == "cd" * 32


# ------------------------------------------------------------------ sd_notify
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_datagram(tmp_path, abstract):
    import socket

    from stallscope.tracer import sdnotify
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"stallscope-unit-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        addr = "@" + name
    else:
        addr = str(tmp_path / "n.sock")
        s.bind(addr)
    s.settimeout(5)
    try:
        assert sdnotify.notify("READY=1\nSTATUS=tracing vfs (fentry)", {"NOTIFY_SOCKET": addr})
        assert s.recv(4096) == b"READY=1\nSTATUS=tracing vfs (fentry)"
    finally:
        s.close()


def test_sd_notify_without_systemd(tmp_path):
    from stallscope.tracer import sdnotify
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    with pytest.raises(OSError):
        sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})

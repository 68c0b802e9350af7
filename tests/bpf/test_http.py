"""Throttled API calls blamed for GPU idle, end to end on 127.0.0.1.

A trainer registered on the simulated GPU alternates "kernels" with a blocking API call
that a local server throttles (429 + Retry-After, or S3's 503 Slow Down to the head of
chosen part uploads) before it succeeds; a distractor process, not on the GPU, calls the
same throttled server at the same time. The real tracer (`stallscope trace --output`,
families http + sched) records it and `stallscope report --json` judges it: every call
window's idle interval must be blamed on the trainer's throttled call (endpoint, status,
attempt count, pid), never on the distractor. Plaintext: the distractor's requests are
traced too (so "not blamed" cannot pass by not seeing them). TLS: they are not traced at
all (no uprobes outside the GPU's processes), and the trainer's are.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.bench_accuracy import _wait_line
from stallscope.collector.store import load_batches
from tests.fixtures.httpfault import S3Server, ThrottleServer, make_cert

pytestmark = pytest.mark.bpf
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY_CALLER = "import sys; from tests.fixtures.httpfault import caller_main; caller_main(sys.argv[1:])"


def run_scenario(tmp, url, client, ca=None, windows=2, path="/ckpt/step", client_args=()):
    """Tracer + trainer + distractor; returns what the test checks."""
    from stallscope.sim import nvmlsim
    lib = nvmlsim.build()
    state = nvmlsim.create_state(os.path.join(tmp, "sim.state"), n_gpus=1, period_ms=100)
    env = {**os.environ, "STALLSCOPE_NVMLSIM_STATE": state, "PYTHONPATH": ROOT}
    rec = os.path.join(tmp, "rec.ssrec")
    tlog, dlog = os.path.join(tmp, "trainer.jsonl"), os.path.join(tmp, "distractor.jsonl")
    common = ["--client", client, "--url", url, "--scratch", tmp, *client_args] + (["--ca", ca] if ca else [])
    tracer = subprocess.Popen([sys.executable, "-m", "stallscope", "trace", "--quiet", "--gpu", "--nvml-lib", lib,
                               "--families", "http,sched", "--output", rec], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE)
    procs = [tracer]
    try:
        head = _wait_line(tracer, "stallscope: tracing", 120)
        dis = subprocess.Popen([sys.executable, "-c", PY_CALLER, *common, "--path", "/other/job", "--windows", "40",
                                "--gap-s", "0.4", "--warmup-s", "0.5", "--log", dlog, "--comm", "distractor"],
                               cwd=ROOT, env=env)
        procs.append(dis)
        trainer = subprocess.run([sys.executable, "-c", PY_CALLER, *common, "--path", path,
                                  "--windows", str(windows), "--state", state, "--log", tlog],
                                 cwd=ROOT, env=env, timeout=180, capture_output=True, text=True)
        assert trainer.returncode == 0, trainer.stderr[-3000:]
        time.sleep(1.5)
    finally:
        for p in procs[1:]:
            p.kill()
            p.wait()
        tracer.send_signal(signal.SIGINT)
        try:
            _out, err = tracer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            tracer.kill()
            _out, err = tracer.communicate()
    r = subprocess.run([sys.executable, "-m", "stallscope", "report", "--json", rec], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    text = subprocess.run([sys.executable, "-m", "stallscope", "report", rec], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120).stdout
    ends = subprocess.run([sys.executable, "-m", "stallscope", "report", "--endpoints", rec], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120).stdout
    rows = []
    for b in load_batches(rec):
        t = b.tables.get("http")
        if t is not None:
            rows += [{c: (v[i].item() if hasattr(v[i], "item") else v[i]) for c, v in t.items()}
                     for i in range(len(t["pid"]))]
    truth = [json.loads(x) for x in open(tlog)]
    dis_truth = [json.loads(x) for x in open(dlog)] if os.path.exists(dlog) else []
    return {"verdicts": [json.loads(x) for x in r.stdout.splitlines() if x.strip()], "text": text,
            "endpoints": [json.loads(x) for x in ends.splitlines() if x.strip()], "rows": rows,
            "calls": [x for x in truth if x["kind"] == "call"],
            "trainer_pid": next(x["pid"] for x in truth if x["kind"] == "ready"),
            "distractor_pid": next((x["pid"] for x in dis_truth if x["kind"] == "ready"), None),
            "distractor_calls": [x for x in dis_truth if x["kind"] == "call"],
            "tracer_log": head + err.decode(errors="replace")}


def check(res, host, status, errors_per_call, reason, tls, klass="api_throttling", outcome="throttled"):
    calls, pid, dpid = res["calls"], res["trainer_pid"], res["distractor_pid"]
    assert calls and dpid, res
    assert res["distractor_calls"], "the distractor made no call while the trainer ran"
    for c in calls:
        best, best_ov = None, 0
        for v in res["verdicts"]:
            ov = min(v["idle_end_ns"], c["end_ns"]) - max(v["idle_start_ns"], c["start_ns"])
            if ov > best_ov:
                best, best_ov = v, ov
        assert best is not None, ("no idle interval for the call", c, res["verdicts"])
        ch = best["chain"]
        assert best["verdict"] == "culprit" and ch and ch["kind"] == "http", (c, best, res["tracer_log"][-2000:])
        assert best["class"] == klass, best
        assert ch["pid"] == pid, best
        assert ch["targets"][0]["server"] == host, best
        assert ch["answers"].get(str(status), 0) >= errors_per_call, best
        assert ch["count"] >= errors_per_call + 1, best        # attempts: the errors and the success
        assert best["culprit"]["tls"] == int(tls), best
    blamed = {v["chain"]["pid"] for v in res["verdicts"] if v.get("chain")}
    assert dpid not in blamed, res["verdicts"]
    mine = [r for r in res["rows"] if r["pid"] == dpid]
    if tls:
        assert not mine, ("TLS uprobes reached a process that is not a GPU owner", mine[:3])
    else:
        assert any(r["status"] == status for r in mine), ("the distractor's throttled calls were not traced", mine)
    for r in res["rows"]:                              # only the classified fields left the kernel
        assert "?" not in r["path"] and "secret" not in r["path"] and "token" not in r["path"], r
    line = f"{outcome}, {f'{status} {reason}' if status else 'no answer'} x"
    assert line in res["text"], res["text"]
    ep = {e["host"]: e for e in res["endpoints"]}
    spent = ep[host]["timeout_ns"] if klass == "api_timeout" else ep[host]["throttled_ns"]
    assert ep[host]["gpu_idle_ns"] > 0 and spent > 0 and pid in ep[host]["blamed_pids"], ep


@pytest.fixture
def cert(tmp_path):
    return make_cert(str(tmp_path))


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_requests_429_retry_after_blamed(tmp_path, cert, tls):
    with ThrottleServer(tls=tls, cert=cert, fail=2, status=429, retry_after=1) as srv:
        res = run_scenario(str(tmp_path), srv.url, "requests", ca=cert[0] if tls else None)
    check(res, f"127.0.0.1:{srv.port}", 429, 2, "Too Many Requests", tls)
    for v in res["verdicts"]:
        if v.get("chain"):
            assert v["chain"]["targets"][0]["name"].startswith(f"127.0.0.1:{srv.port}/ckpt/step-"), v


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_requests_timeouts_blamed(tmp_path, cert, tls):
    """The server does not answer the first two attempts of each call; the client gives up
    after 0.6 s each time (urllib3 closes the connection and retries). Over TLS the request
    is keyed by its SSL *, and only the socket's close says it was abandoned: the probe
    links the two through the socket write the request head causes."""
    with ThrottleServer(tls=tls, cert=cert, fail=2, hang_s=2.0) as srv:
        res = run_scenario(str(tmp_path), srv.url, "requests", ca=cert[0] if tls else None,
                           client_args=("--timeout", "0.6"))
    check(res, f"127.0.0.1:{srv.port}", 0, 2, "", tls, klass="api_timeout", outcome="timed out")
    for v in res["verdicts"]:
        if v.get("chain"):
            assert v["chain"]["answers"].get("200") == 1, v      # the attempt that got through


def test_openai_sdk_429_blamed(tmp_path, cert):
    with ThrottleServer(tls=True, cert=cert, fail=2, status=429, retry_after=1) as srv:
        res = run_scenario(str(tmp_path), srv.url, "openai", ca=cert[0])
    check(res, f"127.0.0.1:{srv.port}", 429, 2, "Too Many Requests", True)
    assert "LLM API call POST" in res["text"], res["text"]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_boto3_multipart_503_slowdown_blamed(tmp_path, cert, tls):
    with S3Server(tls=tls, cert=cert, fail=2, fail_parts=(2,)) as srv:
        res = run_scenario(str(tmp_path), srv.url, "boto3", ca=cert[0] if tls else None)
    check(res, f"127.0.0.1:{srv.port}", 503, 2, "Slow Down", tls)
    assert "checkpoint upload PUT" in res["text"], res["text"]

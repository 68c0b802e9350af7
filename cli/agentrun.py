"""Run a node agent for a command: signals, the ready line scripts wait for, errors as
one-line ClickExceptions."""

from __future__ import annotations

import signal

import click

from stallscope.tracer import kernel, privileges, sdnotify
from stallscope.tracer.agent import Agent, AgentConfig
from stallscope.tracer.bpfload import ProbeError


def run_agent(cfg: AgentConfig, sinks: list, duration, quiet=False) -> Agent:
    """Start and run an agent; raises click.ClickException with one line on failure."""
    agent = Agent(cfg, sinks, log=(lambda m: None) if quiet else None)
    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True
    # Ctrl-C and SIGTERM only set a flag: the loop finishes its tick, drains the
    # rings and flushes a final batch, so nothing already captured is lost.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        agent.start()
    except (kernel.Unavailable, ProbeError) as e:
        agent.close()
        raise click.ClickException(str(e)) from None
    # probes attached: keep only the capabilities the loop still uses (tracer/privileges.py)
    privileges.drop_after_start(agent)
    # one status line even with --quiet: scripts wait for it
    click.echo(f"stallscope: tracing stalls >= {cfg.probe.min_latency_ns / 1e6:g} ms"
               + (f" of pid {cfg.probe.pid}" if cfg.probe.pid else "")
               + (f" for {duration:g} s" if duration else "; Ctrl-C to end"), err=True)
    # systemd (Type=notify): ready once the probes are attached, and which families are
    _notify("READY=1\nSTATUS=" + attach_status(agent))
    try:
        agent.run(duration, stop=lambda: stop["flag"])
    finally:
        _notify("STOPPING=1")
        agent.close()
    return agent


def attach_status(agent: Agent) -> str:
    """One line: the families traced and how, and those that could not load."""
    s = "tracing " + ", ".join(f"{p.family} ({p.method})" for p in agent.loaded)
    if agent.failed:
        s += "; not loaded: " + ", ".join(sorted(agent.failed))
    return s


def _notify(state: str):
    try:
        sdnotify.notify(state)
    except OSError as e:        # a wrong NOTIFY_SOCKET must not stop the tracing; said even with --quiet
        click.echo(f"stallscope: sd_notify {state.split(chr(10))[0]} to $NOTIFY_SOCKET failed: "
                   f"{e.strerror or e}", err=True)

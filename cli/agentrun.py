"""Run a node agent for a command: signals, the ready line scripts wait for, errors as
one-line ClickExceptions."""

from __future__ import annotations

import signal

import click

from stallscope.tracer import kernel
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
    # one status line even with --quiet: scripts wait for it
    click.echo(f"stallscope: tracing stalls >= {cfg.probe.min_latency_ns / 1e6:g} ms"
               + (f" of pid {cfg.probe.pid}" if cfg.probe.pid else "")
               + (f" for {duration:g} s" if duration else "; Ctrl-C to end"), err=True)
    try:
        agent.run(duration, stop=lambda: stop["flag"])
    finally:
        agent.close()
    return agent

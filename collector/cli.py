"""The `stallscope` command: trace (tracer/cli.py), collect and report."""

from __future__ import annotations

import click

from tracer import __version__
from tracer.cli import trace

MAIN_EPILOG = """\b
Examples:
  sudo stallscope trace                            # live stalls on this node
  stallscope collect --bind tcp://0.0.0.0:5557 --store /var/lib/stallscope/store.db
  sudo stallscope trace --collector tcp://collector:5557 --quiet
  stallscope report --store /var/lib/stallscope/store.db --json
"""


@click.group(epilog=MAIN_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stallscope")
def cli():
    """Find the IO or packet stall that starved each idle GPU."""


cli.add_command(trace)


def _register():
    from . import commands
    for c in commands.COMMANDS:
        cli.add_command(c)


def main():
    _register()
    cli(prog_name="stallscope")


if __name__ == "__main__":
    main()

"""The `stallscope` command group: one module per subcommand in commands/."""

from __future__ import annotations

import click

from stallscope import __version__
from stallscope.commands.collect import collect
from stallscope.commands.demo import demo
from stallscope.commands.keys import keys
from stallscope.commands.report import report
from stallscope.commands.trace import trace
from stallscope.commands.watch import watch

MAIN_EPILOG = """\b
Examples:
  sudo stallscope trace                            # live stalls on this node
  sudo stallscope watch                            # live verdicts for this node's GPUs
  stallscope collect --bind tcp://0.0.0.0:5557 --store /var/lib/stallscope/store.db
  sudo stallscope trace --collector tcp://collector:5557 --quiet
  stallscope report --store /var/lib/stallscope/store.db --json
  stallscope keys --help                           # keys for encrypted, authenticated streams
"""


@click.group(epilog=MAIN_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stallscope")
def cli():
    """Find the IO or packet stall that starved each idle GPU."""


for _cmd in (trace, watch, collect, report, demo, keys):
    cli.add_command(_cmd)


def main():
    cli(prog_name="stallscope")


if __name__ == "__main__":
    main()

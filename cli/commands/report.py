"""`stallscope report`: verdicts for every GPU idle interval in a store or a recording."""

from __future__ import annotations

import json
import sys

import click

from stallscope.analysis import analyze
from stallscope.analysis.text import format_text
from stallscope.analysis.verdict import group_verdicts
from stallscope.collector.store import StoreError, load_batches
from stallscope.options import DEFAULT_STORE

REPORT_EPILOG = """\b
Examples:
  stallscope report                                  # the default store, as a table
  stallscope report node7.ssrec                      # a recording from `trace --output`
  stallscope report --store rack3.db --json | jq 'select(.verdict != "culprit")'
  stallscope report --store rack3.db --json | jq 'select(.class == "checkpoint_write") | .chain'
  stallscope report --group rack3.db                 # repeated culprits, one JSON line each
"""


def load_or_fail(src: str) -> list:
    try:
        return load_batches(src, warn=lambda m: click.echo(f"stallscope report: warning: {m}", err=True))
    except FileNotFoundError:
        raise click.ClickException(f"no such store or recording: {src}") from None
    except (StoreError, OSError) as e:
        raise click.ClickException(str(e)) from None


@click.command("report", epilog=REPORT_EPILOG)
@click.argument("source", required=False)
@click.option("--store", default=None, help="Store file or recording (same as SOURCE).")
@click.option("--json", "as_json", is_flag=True, help="One JSON verdict per line.")
@click.option("--group", "as_groups", is_flag=True,
              help="Repeated culprits instead: one JSON line per (class, filesystem or server, "
                   "path pattern with digits collapsed), most idle GPU time first.")
def report(source, store, as_json, as_groups):
    """Verdicts per GPU idle interval from a store or a recording; the table ends with the
    repeated culprits and the idle GPU time they explain."""
    res = analyze.analyze(load_or_fail(source or store or DEFAULT_STORE))
    if as_groups:
        for g in group_verdicts(res.verdicts):
            sys.stdout.write(json.dumps(g, separators=(",", ":")) + "\n")
    elif as_json:
        for v in res.verdicts:
            sys.stdout.write(json.dumps(v.to_json(), separators=(",", ":")) + "\n")
    else:
        click.echo(format_text(res))

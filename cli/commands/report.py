"""`stallscope report`: verdicts for every GPU idle interval in a store or a recording."""

from __future__ import annotations

import json
import sys

import click

from stallscope.analysis import analyze
from stallscope.analysis.text import format_text
from stallscope.collector.store import StoreError, load_batches
from stallscope.options import DEFAULT_STORE

REPORT_EPILOG = """\b
Examples:
  stallscope report                                  # the default store, as a table
  stallscope report node7.ssrec                      # a recording from `trace --output`
  stallscope report --store rack3.db --json | jq 'select(.verdict != "culprit")'
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
def report(source, store, as_json):
    """Verdicts per GPU idle interval from a store or a recording."""
    res = analyze.analyze(load_or_fail(source or store or DEFAULT_STORE))
    if as_json:
        for v in res.verdicts:
            sys.stdout.write(json.dumps(v, separators=(",", ":")) + "\n")
    else:
        click.echo(format_text(res))

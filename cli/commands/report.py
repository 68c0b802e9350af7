"""`stallscope report`: verdicts for every GPU idle interval in a store or a recording."""

from __future__ import annotations

import json
import sys

import click

from stallscope.analysis import analyze
from stallscope.analysis.http_episodes import endpoint_summary
from stallscope.analysis.text import format_text
from stallscope.analysis.verdict import group_verdicts
from stallscope.collector.store import StoreError, load_batches
from stallscope.export import chrome_trace
from stallscope.export import html as html_report
from stallscope.options import DEFAULT_STORE

REPORT_EPILOG = """\b
Examples:
  stallscope report                                  # the default store, as a table
  stallscope report node7.ssrec                      # a recording from `trace --output`
  stallscope report --store rack3.db --json | jq 'select(.verdict != "culprit")'
  stallscope report --store rack3.db --json | jq 'select(.class == "checkpoint_write") | .chain'
  stallscope report --group rack3.db                 # repeated culprits, one JSON line each
  stallscope report --endpoints rack3.db             # per API host: throttled s, GPU idle s
  stallscope report rack3.db --trace run.json        # open in ui.perfetto.dev ("Open trace file")
  stallscope report rack3.db --html run.html         # one offline file: timeline + verdicts
  stallscope report node7.ssrec --trace t.json --trace-base-ns "$(jq .baseTimeNanoseconds kineto.json)"
"""


class _Progress:
    """Progress bars on stderr while a large source is decoded and analyzed; tqdm's
    ``disable=None`` keeps them quiet when stderr is not a terminal (stdout stays data)."""

    def __init__(self):
        self.bar = None
        self.desc = ""

    def _open(self, desc: str, **kw):
        from tqdm import tqdm  # here: the rest of the CLI (and the VM guest) runs without it

        self.close()
        self.desc = desc
        self.bar = tqdm(file=sys.stderr, disable=None, leave=False, dynamic_ncols=True,
                        desc=desc, **kw)

    def decoded(self, n: int, total) -> None:
        if self.bar is None:
            self._open("decode", total=total, unit=" batches")
        self.bar.update(n - self.bar.n)

    def step(self, desc: str) -> None:
        """A step without a count: its name and the time it has taken."""
        self._open(desc, bar_format="{desc} {elapsed}")

    def written(self, n: int, total: int) -> None:
        if self.bar is None or self.desc != "write trace events":
            self._open("write trace events", total=total, unit=" events")
        self.bar.update(n - self.bar.n)

    def phase(self, name: str) -> None:
        if self.bar is None or self.desc != "analyze":
            self._open("analyze", total=len(analyze.PHASES), unit=" phases")
        else:
            self.bar.update(1)
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_or_fail(src: str, progress=None) -> list:
    try:
        return load_batches(src, warn=lambda m: click.echo(f"stallscope report: warning: {m}", err=True),
                            progress=progress)
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
@click.option("--endpoints", "as_endpoints", is_flag=True,
              help="Per API endpoint (HTTP host) instead: one JSON line each with its requests, "
                   "calls, throttled/error/timeout seconds and the idle GPU seconds blamed on it.")
@click.option("--trace", "trace_path", metavar="FILE",
              help="Also write a Chrome trace (Trace Event Format JSON) for ui.perfetto.dev or "
                   "chrome://tracing: per GPU utilization and idle intervals by verdict, per "
                   "owner thread its stalls, an arrow from each culprit to its interval.")
@click.option("--trace-base-ns", type=int, default=0, show_default=True, metavar="NS",
              help="Trace timestamps relative to this epoch ns (a PyTorch/Kineto trace's "
                   "baseTimeNanoseconds) instead of epoch microseconds.")
@click.option("--html", "html_path", metavar="FILE",
              help="Also write one self-contained, offline HTML file: a zoomable timeline of "
                   "utilization, idle intervals, culprit stalls and their links, and the verdicts.")
def report(source, store, as_json, as_groups, as_endpoints, trace_path, trace_base_ns, html_path):
    """Verdicts per GPU idle interval from a store or a recording; the table ends with the
    repeated culprits and the idle GPU time they explain."""
    src = source or store or DEFAULT_STORE
    bars = _Progress()
    try:
        batches = load_or_fail(src, progress=bars.decoded)
        res = analyze.analyze(batches, on_phase=bars.phase)
        bars.close()
        del batches
        for path, what, write in (
                (trace_path, "trace", lambda p: chrome_trace.export(res, p, trace_base_ns, bars.written)),
                (html_path, "HTML report", lambda p: html_report.export(res, p, src))):
            if not path:
                continue
            bars.step(f"{what} {path}: building")
            try:
                n = write(path)
            except OSError as e:
                raise click.ClickException(f"cannot write the {what} {path}: {e.strerror or e}") from None
            except ValueError as e:
                raise click.ClickException(f"cannot write the {what}: {e}") from None
            finally:
                bars.close()
            click.echo(f"stallscope report: wrote {what} {path} ("
                       + ", ".join(f"{v} {k}" for k, v in n.items()) + ")", err=True)
    finally:
        bars.close()
    if as_endpoints:
        for g in endpoint_summary(res):
            sys.stdout.write(json.dumps(g, separators=(",", ":")) + "\n")
    elif as_groups:
        for g in group_verdicts(res.verdicts):
            sys.stdout.write(json.dumps(g, separators=(",", ":")) + "\n")
    elif as_json:
        for v in res.verdicts:
            sys.stdout.write(json.dumps(v.to_json(), separators=(",", ":")) + "\n")
    else:
        click.echo(format_text(res))

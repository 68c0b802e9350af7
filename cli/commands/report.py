"""`stallscope report`: verdicts for every GPU idle interval in a store, a recording, or a
Parquet lake (``--lake``: analysed on Dask, analysis/fleet.py)."""

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

\b
A lake (`collect --lake`), analysed on Dask: a local cluster (one worker per CPU) by default,
or an existing one whose workers have stallscope[fleet] installed and reach the lake URL:
  stallscope report --lake /shared/stallscope-lake --workers 8
  stallscope report --lake s3://fleet/lake --lake-option endpoint_url=http://minio:9000 --json
  stallscope report --lake s3://fleet/lake --scheduler tcp://dask-scheduler:8786 --group
  # Slurm (dask-jobqueue): SLURMCluster(cores=8, processes=8, memory="64GB").scale(jobs=16);
  #   pass its .scheduler_address (tcp://NODE:PORT) while that Python process keeps it up
  # Kubernetes (dask-kubernetes): KubeCluster(name="fleet") serves tcp://fleet-scheduler:8786
  #   in the cluster; from outside: kubectl port-forward svc/fleet-scheduler 8786, then
  stallscope report --lake s3://fleet/lake --scheduler tcp://localhost:8786
"""


class _UsageExit(click.ClickException):
    """A one-line error, exit status 2 (a source or scheduler that cannot be used)."""

    exit_code = 2


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

    def tasks(self, stage: str, done: int, total: int) -> None:
        """Fleet report: Dask tasks of a stage ("nodes", "jobs", "verdicts") done."""
        if self.bar is None or self.desc != stage:
            self._open(stage, total=total, unit=" tasks")
        self.bar.update(done - self.bar.n)

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


def _fleet(url, lake_options, scheduler, workers, bars, exports: bool, endpoints: bool):
    """fleet_report() with its errors as one-line ClickExceptions (exit 2: the lake or the
    scheduler cannot be used).  The workers send back the tables the output draws: all for
    the exports, the HTTP requests for the endpoint summary (its own, or the table's)."""
    from stallscope.analysis.fleet import EXPORT_KINDS, FleetError, SchedulerError, fleet_report
    from stallscope.commands.collect import parse_lake_options
    from stallscope.wire.lake import LakeError

    tables = EXPORT_KINDS if exports else ("http",) if endpoints else None
    try:
        return fleet_report(url, scheduler=scheduler, workers=workers,
                            storage_options=parse_lake_options(lake_options) or None,
                            progress=bars.tasks, tables=tables)
    except (LakeError, SchedulerError) as e:
        raise _UsageExit(str(e)) from None
    except (FleetError, OSError, ValueError) as e:
        raise click.ClickException(f"lake {url}: {e}") from None


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
@click.option("--lake", metavar="URL", default=None,
              help="Analyse a Parquet lake (`collect --lake`: a path or an fsspec URL such as "
                   "s3://bucket/lake) instead of a store, on Dask: per-node blame as one task per "
                   "node, the cross-node pass as one task per job. Same output as for a store.")
@click.option("--lake-option", "lake_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option for --lake (repeatable; dotted keys nest).")
@click.option("--scheduler", metavar="ADDR", default=None,
              help="With --lake: the Dask scheduler to run on (tcp://host:8786); its workers read "
                   "the lake themselves. Default: a local cluster for this report.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --lake and no --scheduler: local worker processes (default: one per CPU).")
def report(source, store, as_json, as_groups, as_endpoints, trace_path, trace_base_ns, html_path,
           lake, lake_options, scheduler, workers):
    """Verdicts per GPU idle interval from a store, a recording or a lake; the table ends
    with the repeated culprits and the idle GPU time they explain."""
    if lake and (source or store):
        raise click.UsageError("give a store/recording or --lake, not both")
    if (scheduler or workers or lake_options) and not lake:
        raise click.UsageError("--scheduler, --workers and --lake-option go with --lake")
    if scheduler and workers:
        raise click.UsageError("--workers sizes the local cluster: not with --scheduler")
    src = lake or source or store or DEFAULT_STORE
    bars = _Progress()
    try:
        if lake:
            res = _fleet(lake, lake_options, scheduler, workers, bars, bool(trace_path or html_path),
                         as_endpoints or not (as_json or as_groups))
        else:
            batches = load_or_fail(src, progress=bars.decoded)
            res = analyze.analyze(batches, on_phase=bars.phase)
            del batches
        bars.close()
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

"""`python -m bench [tracer|blame|ingest|accuracy|fuzz|wire|http|soak|fleet] [--quick]`: run the benchmarks, one JSON line per figure.

Every figure comes with its same-run baseline (a ratio), since these machines
are shared and noisy. The tracer figures need root (they load real probes).
"""

import importlib
import sys

SUITES = {"tracer": "bench.tracer_bench", "blame": "bench.bench_blame", "ingest": "bench.bench_ingest",
          "accuracy": "bench.bench_accuracy", "fuzz": "bench.bench_fuzz", "wire": "bench.bench_wire",
          "http": "bench.bench_http", "soak": "bench.bench_soak", "fleet": "bench.fleet"}
# their own options (`soak --minutes 30 --tracers 8`, `fleet --nodes 1024 --json`); never part of a plain run
LONG = {"soak", "fleet"}


def main(argv):
    quick = "--quick" in argv
    if argv[:1] and argv[0] in LONG:
        return importlib.import_module(SUITES[argv[0]]).main(quick=quick, argv=[a for a in argv[1:] if a != "--quick"])
    names = [a for a in argv if not a.startswith("-")] or [n for n in SUITES if n not in LONG]
    for name in names:
        if name not in SUITES:
            sys.exit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        try:
            mod = importlib.import_module(SUITES[name])
        except ImportError as e:
            print(f'{{"suite": "{name}", "skipped": "{e}"}}', flush=True)
            continue
        mod.main(quick=quick)


if __name__ == "__main__":
    main(sys.argv[1:])

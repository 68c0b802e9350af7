"""`python -m bench [tracer|blame|ingest|accuracy|fuzz|wire|http] [--quick]`: run the benchmarks, one JSON line per figure.

Every figure comes with its same-run baseline (a ratio), since these machines
are shared and noisy. The tracer figures need root (they load real probes).
"""

import importlib
import sys

SUITES = {"tracer": "bench.tracer_bench", "blame": "bench.bench_blame", "ingest": "bench.bench_ingest",
          "accuracy": "bench.bench_accuracy", "fuzz": "bench.bench_fuzz", "wire": "bench.bench_wire",
          "http": "bench.bench_http"}


def main(argv):
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("-")] or list(SUITES)
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

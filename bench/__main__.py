"""`python -m bench [SUITE ...] [--quick]`: run the benchmarks, one JSON line per figure.

With no suite named it runs the default set (``make bench``: tracer, blame, ingest, wire,
http; under 10 minutes on a 2-core machine), then a last line with each suite's seconds.
The long suites run only when named (``make bench-long``): accuracy (~10 min), fuzz
(~3 min), soak (30 min by default, ``soak --minutes 30 --tracers 8``) and fleet (a
generated fleet hour, ``fleet --nodes 1024 --json``, reported with 1 and 2 workers; ~25 min).

Every figure comes with its same-run baseline (a ratio), since these machines are shared
and noisy. The tracer, http, accuracy and soak figures need root (they load real probes).
"""

import importlib
import json
import sys
import time

SUITES = {"tracer": "bench.tracer_bench", "blame": "bench.bench_blame", "ingest": "bench.bench_ingest",
          "wire": "bench.bench_wire", "http": "bench.bench_http",
          "accuracy": "bench.bench_accuracy", "fuzz": "bench.bench_fuzz", "soak": "bench.bench_soak",
          "fleet": "bench.fleet"}
DEFAULT = ("tracer", "blame", "ingest", "wire", "http")
# their own options (`soak --minutes 30 --tracers 8`, `fleet --nodes 1024 --json`)
OWN_ARGS = {"soak", "fleet"}


def main(argv):
    quick = "--quick" in argv
    if argv[:1] and argv[0] in OWN_ARGS:
        return importlib.import_module(SUITES[argv[0]]).main(quick=quick, argv=[a for a in argv[1:] if a != "--quick"])
    names = [a for a in argv if not a.startswith("-")] or list(DEFAULT)
    for name in names:
        if name not in SUITES:
            sys.exit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    seconds = {}
    t_all = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        try:
            mod = importlib.import_module(SUITES[name])
        except ImportError as e:
            print(json.dumps({"suite": name, "skipped": str(e)}), flush=True)
            continue
        mod.main(quick=quick)
        seconds[name] = round(time.monotonic() - t0, 1)
    print(json.dumps({"bench": "suites", "quick": quick, "seconds": seconds,
                      "total_seconds": round(time.monotonic() - t_all, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

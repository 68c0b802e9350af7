# stallscope: the two commands README.md starts with, plus the benchmarks.
.PHONY: setup demo test lint test-unit test-bpf test-vm test-vm-matrix bench bench-long

setup:
	@bash .ci/setup.sh

# set up, then run the tracer with an embedded collector on this node; without a
# GPU it runs a starving training-like workload on the simulated GPU
demo: setup
	.venv/bin/stallscope demo

# set up, then run every test tier this machine supports; bpf and vm tests may
# not skip here (a broken set-up must not pass as green)
# The vm tier boots every kernel of the matrix (VM_KERNELS: Debian 11's 5.10, 12's 6.1,
# 13's 6.12), one after another after the host tiers (images it lacks build in the
# background meanwhile); `make test VM_KERNELS=6.1` boots one
VM_KERNELS ?= 5.10,6.1,6.12
test: setup lint
	STALLSCOPE_REQUIRE_BPF=1 STALLSCOPE_REQUIRE_VM=1 STALLSCOPE_VM_KERNELS=$(VM_KERNELS) .venv/bin/python -m pytest -q --durations=15 tests

# style and types (configured in pyproject.toml)
lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test-unit: setup
	.venv/bin/python -m pytest -q tests/unit -m "not bpf"

test-bpf: setup
	STALLSCOPE_REQUIRE_BPF=1 .venv/bin/python -m pytest -q tests -m bpf

test-vm: setup
	STALLSCOPE_REQUIRE_VM=1 STALLSCOPE_VM_KERNELS=$(VM_KERNELS) .venv/bin/python -m pytest -q tests/vm

# the vm tier alone (every kernel unless VM_KERNELS says); rewrite README's kernel table
# from its results with `python3 tests/vm/matrix.py --write`
test-vm-matrix: test-vm

# README's measured figures with their same-run baselines (root): tracer, blame, ingest,
# wire, http, under 10 minutes on 2 cores; the last line gives each suite's seconds
bench: setup
	.venv/bin/python -m bench $(BENCH_ARGS)

# the long ones: accuracy (~10 min), decoder fuzzing (~3 min), the 30-minute soak and the
# fleet hour (generated, then reported with 1 and 2 Dask workers: ~25 min, in a temporary lake)
bench-long: setup
	.venv/bin/python -m bench accuracy fuzz
	.venv/bin/python -m bench soak --minutes 30 --tracers 8
	.venv/bin/python -m bench fleet --json

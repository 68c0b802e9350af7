# stallscope: the two commands README.md starts with, plus the benchmarks.
.PHONY: setup demo test lint test-unit test-bpf test-vm bench

setup:
	@bash .ci/setup.sh

# set up, then run the tracer with an embedded collector on this node; without a
# GPU it runs a starving training-like workload on the simulated GPU
demo: setup
	.venv/bin/stallscope demo

# set up, then run every test tier this machine supports; bpf and vm tests may
# not skip here (a broken set-up must not pass as green)
test: setup lint
	STALLSCOPE_REQUIRE_BPF=1 STALLSCOPE_REQUIRE_VM=1 .venv/bin/python -m pytest -q tests

# style and types (configured in pyproject.toml)
lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test-unit: setup
	.venv/bin/python -m pytest -q tests/unit -m "not bpf"

test-bpf: setup
	STALLSCOPE_REQUIRE_BPF=1 .venv/bin/python -m pytest -q tests -m bpf

test-vm: setup
	STALLSCOPE_REQUIRE_VM=1 .venv/bin/python -m pytest -q tests/vm

# every README figure with its same-run baseline (root for tracer and accuracy)
bench: setup
	.venv/bin/python -m bench $(BENCH_ARGS)

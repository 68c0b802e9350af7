#!/usr/bin/env bash
# gpu tier, on the GPU test machine as it is: its python3 (torch, nvidia-ml-py, numpy), no
# registry, no installs.  Usage: bash tests/gpu/run.sh [OUT_DIR]   (default $OUT, else ./gpu-out)
#   Part A (tests/gpu/nvml_check.py): real NVML sampler + idle detection vs known idle phases.
#   Part B (tests/gpu/gpu_check.py): full verdict with BPF probes; run only where bpf(), BTF,
#          BCC, pyzmq and FUSE are all there, else one line says why it is skipped.
# Exit status: Part A's (and Part B's, when it runs).  Extra args go to nvml_check.py
# (--sim: the NVML simulator instead of the GPU, to try this script without one; --quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-./gpu-out}}
shift || true
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
TREE=$(mktemp -d /tmp/stallscope-tree.XXXXXX)
trap 'rm -rf "$TREE"' EXIT
"$PY" tests/vm/devtree.py "$PWD" "$TREE" || { echo "FAIL: cannot build the import tree"; exit 1; }
export PYTHONPATH="$TREE" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
date -u '+%F %T UTC'; uname -r
command -v nvidia-smi >/dev/null && nvidia-smi -L

echo "== Part A: NVML sampler and idle intervals on the real GPU"
timeout 240 "$PY" tests/gpu/nvml_check.py "$OUT_DIR" "$@"
a=$?
[ $a -eq 124 ] && echo "FAIL: Part A timed out"

echo "== Part B: full verdict (BPF probes + NVML)"
if why=$("$PY" tests/gpu/nvml_check.py --bpf-gate); then
    timeout 300 "$PY" tests/gpu/gpu_check.py
    b=$?
    exit $(( a || b ))
fi
echo "Part B skipped: $why"
exit $a

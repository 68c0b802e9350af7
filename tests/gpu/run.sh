#!/usr/bin/env bash
# gpu tier, on the GPU test machine as it is: its python3 (torch, nvidia-ml-py, numpy), no
# registry, no installs.  Usage: bash tests/gpu/run.sh [OUT_DIR]   (default $OUT, else ./gpu-out)
#   Part A (tests/gpu/nvml_check.py): real NVML sampler + idle detection vs known idle phases.
#   Part B (tests/gpu/gpu_check.py): full verdict with BPF probes; run only where bpf(), BTF,
#          BCC, pyzmq and FUSE are all there, else one line says why it is skipped.
#   .gpu-bundle/ (built by tests/gpu/bundle.sh, carried with the checkout) supplies BCC, its
#          LLVM, kernel headers, pyzmq, mfusepy and libfuse3: unpacked into a temporary folder
#          and put on LD_LIBRARY_PATH, PYTHONPATH, PATH, BCC_KERNEL_SOURCE, FUSE_LIBRARY_PATH
#          for Part B only.
# Exit status: Part A's (and Part B's, when it runs).  Extra args go to nvml_check.py
# (--sim: the NVML simulator instead of the GPU, to try this script without one; --quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-./gpu-out}}
shift || true
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
TREE=$(mktemp -d /tmp/stallscope-tree.XXXXXX)
BUNDLE=
trap 'rm -rf "$TREE" ${BUNDLE:+"$BUNDLE"}' EXIT
"$PY" tests/vm/devtree.py "$PWD" "$TREE" || { echo "FAIL: cannot build the import tree"; exit 1; }
export PYTHONPATH="$TREE" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
date -u '+%F %T UTC'; uname -r
command -v nvidia-smi >/dev/null && nvidia-smi -L

echo "== Part A: NVML sampler and idle intervals on the real GPU"
timeout 240 "$PY" tests/gpu/nvml_check.py "$OUT_DIR" "$@"
a=$?
[ $a -eq 124 ] && echo "FAIL: Part A timed out"

echo "== Part B: full verdict (BPF probes + NVML)"
if [ -f .gpu-bundle/bundle.tar.xz ]; then
    # not before Part A: its torch must not see the bundle's libraries
    BUNDLE=$(mktemp -d /tmp/stallscope-bundle.XXXXXX)
    if "$PY" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))' \
            .gpu-bundle/bundle.tar.xz "$BUNDLE"; then
        # compiled once here (BCC's module warns about escapes on 3.12+ when compiled each run)
        "$PY" -W ignore -m compileall -q "$BUNDLE/python" >/dev/null 2>&1
        benv=(LD_LIBRARY_PATH="$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
              PYTHONPATH="$BUNDLE/python:$PYTHONPATH" PATH="$BUNDLE/bin:$PATH"
              BCC_KERNEL_SOURCE="$BUNDLE/kernel" FUSE_LIBRARY_PATH="$BUNDLE/lib/libfuse3.so.3")
        if err=$(env "${benv[@]}" "$PY" -c 'import bcc, zmq, mfusepy' 2>&1); then
            export "${benv[@]}"
            echo "bundle: $(head -1 "$BUNDLE/MANIFEST")"
            # FUSE built into the kernel but no device node (a bare /dev): make it
            if [ ! -e /dev/fuse ] && grep -qw fuse /proc/filesystems 2>/dev/null; then
                mknod -m 666 /dev/fuse c 10 229 && echo "bundle: made /dev/fuse"
            fi
        else
            echo "bundle: not usable with $PY ($("$PY" -V 2>&1)): ${err##*$'\n'}"
        fi
    else
        echo "bundle: cannot unpack .gpu-bundle/bundle.tar.xz"
    fi
fi
if why=$("$PY" tests/gpu/nvml_check.py --bpf-gate); then
    timeout 300 "$PY" tests/gpu/gpu_check.py
    b=$?
    exit $(( a || b ))
fi
echo "Part B skipped: $why"
exit $a

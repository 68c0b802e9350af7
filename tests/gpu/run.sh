#!/usr/bin/env bash
# gpu tier: run on a machine with an NVIDIA GPU and driver, as root, from the repo root.
# Sets up (minimal packages), makes sure torch with CUDA is importable, runs the check.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi -L
STALLSCOPE_SETUP_MINIMAL=1 bash .ci/setup.sh
apt-get install -y -qq fuse3 >/dev/null 2>&1 || true
.venv/bin/python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || \
    .venv/bin/pip install -q torch
exec timeout 300 .venv/bin/python tests/gpu/gpu_check.py

#!/usr/bin/env bash
# Set up a node (or CI machine) for stallscope, idempotently, as root:
#  - Debian/Ubuntu packages: BCC, kernel headers (the running kernel's when the
#    archive has them, else the distribution's generic headers, which the tracer
#    merges and uses with BTF offsets), FUSE/nftables for the bpf tests, QEMU and
#    mmdebstrap for the test VM;
#  - a virtualenv in .venv with the Python dependencies and a link to the
#    distribution's bcc module (the PyPI "bcc" is an unrelated project);
#  - the NVML simulator (sim/nvmlsim), used where no GPU is present.
# Set STALLSCOPE_SETUP_MINIMAL=1 to skip the test-only packages.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "setup: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (installs packages and loads BPF programs)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
pkgs=(python3-bpfcc bpfcc-tools bpftool python3-venv python3-dev gcc make iproute2 procps kmod)
if [ -z "${STALLSCOPE_SETUP_MINIMAL:-}" ]; then
    pkgs+=(fuse3 nftables qemu-system-x86 qemu-utils mmdebstrap e2fsprogs cpio chromium systemd curl)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
rel=$(uname -r)
if [ ! -e "/lib/modules/$rel/build" ] && ! ls -d /usr/src/linux-headers-* >/dev/null 2>&1; then
    missing+=(HEADERS)
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt-get update -qq
    want=()
    for p in "${missing[@]}"; do [ "$p" != HEADERS ] && want+=("$p"); done
    if [[ " ${missing[*]} " == *" HEADERS "* ]]; then
        if apt-cache show "linux-headers-$rel" >/dev/null 2>&1; then
            want+=("linux-headers-$rel")
        elif apt-cache show linux-headers-amd64 >/dev/null 2>&1; then
            want+=(linux-headers-amd64)      # Debian: generic headers, merged by the tracer
        elif apt-cache show linux-headers-generic >/dev/null 2>&1; then
            want+=(linux-headers-generic)    # Ubuntu
        else
            log "no kernel headers package found for $rel; the tracer will say what is missing"
        fi
    fi
    [ ${#want[@]} -gt 0 ] && apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

# The venv uses the same Python as the distribution's bcc when it can; any
# CPython 3.9+ works since bcc is pure Python over libbcc.so.
py=python3
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$py" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
if [ -z "${STALLSCOPE_SETUP_MINIMAL:-}" ] && ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    # the bpf tier drives a real PyTorch DataLoader (CPU build; pip takes it from the local wheel cache)
    log "installing torch (CPU) for the DataLoader scenario"
    .venv/bin/pip install -q --disable-pip-version-check 'torch==2.13.0' 2>&1 | grep -v "^WARNING: Location" || true
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for d in /usr/lib/python3/dist-packages/bcc /usr/lib/python3*/site-packages/bcc; do
    if [ -d "$d" ]; then ln -sfn "$d" "$site/bcc"; break; fi
done
.venv/bin/python -c 'import bcc' 2>/dev/null || log "warning: bcc is not importable from .venv"
if [ -f sim/nvmlsim/Makefile ]; then
    make -s -C sim/nvmlsim >/dev/null
fi
mountpoint -q /sys/kernel/tracing 2>/dev/null || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
log "ready (.venv, bcc, headers: $(ls -d /lib/modules/$rel/build /usr/src/linux-headers-* 2>/dev/null | head -3 | tr '\n' ' '))"

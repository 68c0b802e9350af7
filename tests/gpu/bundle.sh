#!/usr/bin/env bash
# Build .gpu-bundle/ (repository root, git-ignored): what Part B of the gpu tier needs and the
# GPU test machine lacks, for a machine with no BCC, pyzmq, mfusepy, libfuse3 or kernel headers
# and no registry.  tests/gpu/run.sh unpacks it (python3's tarfile, into a temporary folder)
# when it is there and points LD_LIBRARY_PATH, PYTHONPATH, PATH, BCC_KERNEL_SOURCE and
# FUSE_LIBRARY_PATH at it for Part B.
# Usage (on a Debian 12 host with python3-bpfcc, libfuse3-3, fuse3, linux-headers-amd64 and
# PyPI access, or WHEELS=DIR holding the two wheels):  bash tests/gpu/bundle.sh
# Ships, in .gpu-bundle/bundle.tar.xz (about 52 MiB; one solid xz stream):
#   lib/     libbcc.so.0 (+ libbcc_bpf.so.0) and libfuse3.so.3 with every library they need
#            except the base system's (libc, libm, libstdc++, libgcc_s, libz, liblzma, libffi,
#            libtinfo); Debian 12's: LLVM/clang 14, z3, ICU 72, libxml2, libedit, libbpf...
#   bin/     fusermount3 (SlowFS checks for it; as root libfuse3 mounts without it)
#   python/  BCC's python module (pure python over ctypes), pyzmq (cp312-abi3 wheel, libzmq
#            inside) and mfusepy, unzipped
#   kernel/  one real (dereferenced) merged tree of Debian's linux-headers-*-common + -amd64,
#            only what BCC reads: include/ and arch/x86/include/ (less drivers' dt-bindings,
#            sound, drm, media, video, Kconfig stamps); struct offsets come from BTF, so the
#            headers' version may differ from the running kernel's
# Environment: PYVER (3.12), PYZMQ / MFUSEPY (versions; default: those in .venv), WHEELS.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu-bundle
PYVER=${PYVER:-3.12}
LIBDIR=/usr/lib/x86_64-linux-gnu
BCCPY=/usr/lib/python3/dist-packages/bcc
# the base system's libraries, left to the GPU machine's own (newer glibc, libstdc++ and
# ncurses are backward compatible; torch in the same processes needs its own libstdc++, bash
# its own libtinfo)
BASE='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|libz|liblzma|libffi|libtinfo)\.'

ver() { [ ! -x .venv/bin/pip ] || .venv/bin/pip show "$1" 2>/dev/null | sed -n 's/^Version: //p' || true; }
PYZMQ=${PYZMQ:-$(ver pyzmq)}
MFUSEPY=${MFUSEPY:-$(ver mfusepy)}
for f in "$LIBDIR/libbcc.so.0" "$LIBDIR/libfuse3.so.3" "$BCCPY/__init__.py"; do
    [ -e "$f" ] || { echo "bundle: $f missing (apt install python3-bpfcc libfuse3-3 fuse3)"; exit 1; }
done
FUSERMOUNT=$(command -v fusermount3 || true)
[ -n "$FUSERMOUNT" ] || { echo "bundle: fusermount3 missing (apt install fuse3)"; exit 1; }
COMMON=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)
ARCH=${COMMON%-common}-amd64
[ -n "$COMMON" ] && [ -d "$ARCH/include/generated" ] || {
    echo "bundle: no Debian kernel headers in /usr/src (apt install linux-headers-amd64)"; exit 1; }

STAGE=$(mktemp -d /tmp/stallscope-bundle.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{lib,bin,python,kernel,wheels}

echo "== libraries"
ldd "$LIBDIR/libbcc.so.0" "$LIBDIR/libfuse3.so.3" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' |
    sort -u | while read -r name path; do
    [[ $name =~ $BASE ]] && continue
    cp -L "$path" "$STAGE/lib/$name"
done
cp -L "$LIBDIR/libbcc.so.0" "$LIBDIR/libfuse3.so.3" "$STAGE/lib/"
[ -e "$LIBDIR/libbcc_bpf.so.0" ] && cp -L "$LIBDIR/libbcc_bpf.so.0" "$STAGE/lib/"
chmod u+w "$STAGE"/lib/*
strip --strip-unneeded "$STAGE"/lib/* 2>/dev/null || true
cp "$FUSERMOUNT" "$STAGE/bin/fusermount3"
# every library's dependencies are in lib/ or in the base set
missing=$(LD_LIBRARY_PATH="$STAGE/lib" ldd "$STAGE"/lib/* | awk '/not found/ {print $1}' | sort -u)
[ -z "$missing" ] || { echo "bundle: unresolved: $missing"; exit 1; }
ls "$STAGE/lib" | tr '\n' ' '; echo

echo "== python: bcc (from $BCCPY), pyzmq $PYZMQ, mfusepy $MFUSEPY (cp${PYVER/./})"
cp -rL "$BCCPY" "$STAGE/python/bcc"
rm -rf "$STAGE/python/bcc/__pycache__"
if [ -n "${WHEELS:-}" ]; then
    cp "$WHEELS"/pyzmq-*.whl "$WHEELS"/mfusepy-*.whl "$STAGE/wheels/"
else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$STAGE/wheels" \
        "pyzmq${PYZMQ:+==$PYZMQ}" "mfusepy${MFUSEPY:+==$MFUSEPY}"
fi
for w in "$STAGE"/wheels/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$STAGE/python"
    basename "$w"
done

echo "== kernel headers: $COMMON + $ARCH"
K=$STAGE/kernel
for src in "$COMMON" "$ARCH"; do           # -amd64 second: its generated/ and config win
    for d in include arch/x86/include; do
        [ -d "$src/$d" ] || continue
        mkdir -p "$K/$d"
        cp -rL "$src/$d/." "$K/$d/"
    done
done
# not read by BPF programs: device-tree constants, sound/drm/media/video drivers, Kconfig stamps
rm -rf "$K"/include/{dt-bindings,sound,drm,media,video,config} "$K"/arch/x86/include/{config,dt-bindings}
find "$K" -type l -print -quit | grep -q . && { echo "bundle: symlinks left in kernel/"; exit 1; }
du -sh "$K" | sed 's/\t.*//'

{
    echo "stallscope gpu bundle, built $(date -u '+%F %T UTC') on $(. /etc/os-release; echo "$PRETTY_NAME")"
    echo "bcc $(dpkg-query -W -f '${Version}' libbpfcc 2>/dev/null || echo '?')," \
         "libfuse3 $(dpkg-query -W -f '${Version}' libfuse3-3 2>/dev/null || echo '?')," \
         "headers $(basename "$ARCH"), wheels: $(cd "$STAGE/wheels" && echo *.whl)"
} > "$STAGE/MANIFEST"
rm -rf "$STAGE/wheels"

echo "== compressing"
rm -rf "$OUT"
mkdir -p "$OUT"
tar -C "$STAGE" --owner=0 --group=0 -cf - MANIFEST lib bin python kernel |
    xz -T0 --lzma2=preset=9e,dict=192MiB > "$OUT/bundle.tar.xz"
cp "$STAGE/MANIFEST" "$OUT/"
du -sh "$OUT"

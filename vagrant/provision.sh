#!/bin/sh
# Provision the stallscope kernel-probe test VM (Debian 11 bullseye, 12 bookworm or
# 13 trixie, amd64: the kernel matrix 5.10, 6.1, 6.12; the package names below are
# the same in all three).
#
# The one provisioning script for both ways of getting the VM:
#   - Vagrant runs it as root in the booted guest (config.vm.provision "shell");
#   - vagrant/build-image.sh runs it as root in the image chroot (mmdebstrap
#     customize hook) with STALLSCOPE_PROVISION_CHROOT=1 set.
# It is idempotent: running it again converges to the same state.
#
# What it sets up, and why:
#   - kernel headers for the guest kernel, BCC (python3-bpfcc, bpfcc-tools): kprobe tests
#   - nfs-kernel-server + nfs-common, export of /srv/nfs to 127.0.0.1: NFS v3/v4.2 tests
#     over loopback (server and client in the same guest)
#   - rdma-core, ibverbs-utils/-providers, perftest: soft-RoCE (rdma_rxe) tests
#   - iproute2 (tc, rdma, nstat), nftables: netem loss/delay, drop rules
#   - Debian's python3 with msgpack, zmq, numpy, click (>= 8.1), tqdm, pytest: the repo's tests run
#     from the shared checkout with PYTHONPATH pointing at it
#   - helpers in /usr/local/sbin: stallscope-nfs-up/-down, stallscope-rxe-up/-down,
#     stallscope-netem (see each one's header)
#   - /etc/stallscope-vm-guest: marks the machine as the test guest, so that
#     tests/vm/guest/ is collected there and nowhere else
# Services the tests need are started on demand by the helpers, not at boot: under
# software emulation every service at boot costs seconds.
set -eu

log() { echo "provision: $*"; }
die() { echo "provision: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v apt-get >/dev/null || die "needs a Debian-based guest (apt-get not found)"

export DEBIAN_FRONTEND=noninteractive
in_chroot=${STALLSCOPE_PROVISION_CHROOT:-0}
arch=$(dpkg --print-architecture)

# ---------------------------------------------------------------- packages
# Refresh the package lists unless they are recent (mmdebstrap has just fetched
# them when this runs in the image chroot).
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -360 2>/dev/null | head -n1)" ]; then
    log "apt-get update"
    apt-get update -q
fi

# Headers for every kernel installed (in the chroot: the image's kernel; in a
# booted box: the running one, when the archive still carries its ABI), plus
# the metapackages, so that the kernel booted next always has matching headers.
kernel_pkgs="linux-image-$arch linux-headers-$arch"
for dir in /lib/modules/*/; do
    [ -d "$dir" ] || continue
    v=$(basename "$dir")
    if apt-cache show "linux-headers-$v" >/dev/null 2>&1; then
        kernel_pkgs="$kernel_pkgs linux-headers-$v"
    fi
done

pkgs="$kernel_pkgs
    python3-bpfcc bpfcc-tools
    nfs-kernel-server nfs-common netbase
    rdma-core ibverbs-utils ibverbs-providers perftest
    iproute2 procps kmod nftables util-linux
    python3 python3-msgpack python3-zmq python3-numpy python3-click python3-pytest python3-tqdm
    fuse3"
log "apt-get install (this is the slow step)"
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $pkgs

# stallscope needs click >= 8.1 (pyproject.toml); Debian 11 packages 7.1. Its python3-click
# comes from Debian 12 instead (pure Python, depends only on python3 >= 3.8 and colorama),
# from a bookworm source pinned below everything else so nothing else is taken from it.
if ! python3 -c 'import sys, click; sys.exit(int(click.__version__.split(".")[0]) < 8)' 2>/dev/null; then
    log "python3-click $(python3 -c 'import click; print(click.__version__)') is older than 8.1: installing bookworm's"
    mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*\/debian\) .*/\2/p' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
    echo "deb ${mirror:-http://deb.debian.org/debian} bookworm main" >/etc/apt/sources.list.d/stallscope-click.list
    printf 'Package: *\nPin: release n=bookworm\nPin-Priority: 100\n' >/etc/apt/preferences.d/stallscope-click
    apt-get update -q
    apt-get install -y -q --no-install-recommends -t bookworm python3-click
    rm -f /etc/apt/sources.list.d/stallscope-click.list /etc/apt/preferences.d/stallscope-click
    apt-get update -q
    python3 -c 'import click; print("provision: click", click.__version__)'
fi

# ---------------------------------------------------------------- NFS export
mkdir -p /srv/nfs /etc/exports.d
chmod 1777 /srv/nfs
cat > /etc/exports.d/stallscope.exports <<'EOF'
# stallscope test VM: loopback-only export for the NFS probe tests (vagrant/provision.sh)
/srv/nfs 127.0.0.1(rw,sync,no_subtree_check,no_root_squash,insecure)
EOF
# Started on demand by stallscope-nfs-up, not at boot.
systemctl disable nfs-server.service >/dev/null 2>&1 || true

# ---------------------------------------------------------------- helpers
cat > /usr/local/sbin/stallscope-nfs-up <<'EOF'
#!/bin/sh
# Start the NFS server for /srv/nfs and mount it over 127.0.0.1.
# usage: stallscope-nfs-up [VERSION ...]     default: 3 4.2
# Each version VER is mounted at /mnt/nfsVER (/mnt/nfs3, /mnt/nfs4.2); extra
# mount options can be given in STALLSCOPE_NFS_OPTS (e.g. "soft,timeo=50").
# Idempotent: a mount that is already there is left alone. Prints the mount points.
set -eu
versions=${*:-3 4.2}
if ! systemctl is-active --quiet nfs-server.service; then
    systemctl start nfs-server.service
fi
exportfs -ra
for v in $versions; do
    case $v in 3|4|4.0|4.1|4.2) ;; *) echo "stallscope-nfs-up: unknown NFS version '$v'" >&2; exit 2;; esac
    mp=/mnt/nfs$v
    mkdir -p "$mp"
    if ! mountpoint -q "$mp"; then
        mount -t nfs -o "vers=$v${STALLSCOPE_NFS_OPTS:+,$STALLSCOPE_NFS_OPTS}" 127.0.0.1:/srv/nfs "$mp"
    fi
    echo "$mp"
done
EOF

cat > /usr/local/sbin/stallscope-nfs-down <<'EOF'
#!/bin/sh
# Unmount every /mnt/nfs* mount made by stallscope-nfs-up and stop the NFS server.
set -eu
for mp in /mnt/nfs*; do
    if mountpoint -q "$mp"; then umount "$mp" || umount -l "$mp"; fi
done
systemctl stop nfs-server.service
EOF

cat > /usr/local/sbin/stallscope-rxe-up <<'EOF'
#!/bin/sh
# Create a soft-RoCE (rdma_rxe) device.
# usage: stallscope-rxe-up [NETDEV [NAME]]   default: NETDEV=ssdummy0, NAME=rxe0
# The default netdev is a dummy interface with 192.0.2.1/24 (created here);
# RDMA traffic between local GIDs loops back inside rdma_rxe, so
#   ibv_rc_pingpong -d rxe0 -g 1 &  ibv_rc_pingpong -d rxe0 -g 1 127.0.0.1
# exercises the verbs data path. NETDEV may also be lo or any existing netdev.
# Idempotent. Prints `rdma link show NAME`.
set -eu
dev=${1:-ssdummy0}
name=${2:-rxe0}
if [ "$dev" = ssdummy0 ]; then
    ip link show ssdummy0 >/dev/null 2>&1 || ip link add ssdummy0 type dummy
    ip -4 addr show dev ssdummy0 | grep -q '192\.0\.2\.1/' || ip addr add 192.0.2.1/24 dev ssdummy0
fi
ip link set "$dev" up
modprobe rdma_rxe
rdma link show "$name/1" >/dev/null 2>&1 || rdma link add "$name" type rxe netdev "$dev"
rdma link show "$name/1"
EOF

cat > /usr/local/sbin/stallscope-rxe-down <<'EOF'
#!/bin/sh
# Delete a soft-RoCE device made by stallscope-rxe-up (and its default dummy netdev).
# usage: stallscope-rxe-down [NAME]          default: rxe0
set -eu
name=${1:-rxe0}
if rdma link show "$name/1" >/dev/null 2>&1; then rdma link delete "$name"; fi
if ip link show ssdummy0 >/dev/null 2>&1; then ip link delete ssdummy0; fi
EOF

cat > /usr/local/sbin/stallscope-netem <<'EOF'
#!/bin/sh
# Put a netem qdisc (loss, delay, ...) on a netdev, or take it off.
# usage: stallscope-netem DEV NETEM-ARGS...   e.g. stallscope-netem lo loss 5% delay 1ms
#        stallscope-netem DEV off             remove the root qdisc
#        stallscope-netem DEV                 show the qdiscs of DEV
# Idempotent (tc qdisc replace).
set -eu
[ $# -ge 1 ] || { echo "usage: stallscope-netem DEV [off | NETEM-ARGS...]" >&2; exit 2; }
dev=$1; shift
if [ $# -eq 0 ]; then
    tc qdisc show dev "$dev"
elif [ "$1" = off ]; then
    tc qdisc del dev "$dev" root 2>/dev/null || true
else
    modprobe sch_netem
    tc qdisc replace dev "$dev" root netem "$@"
    tc qdisc show dev "$dev"
fi
EOF

chmod 0755 /usr/local/sbin/stallscope-nfs-up /usr/local/sbin/stallscope-nfs-down \
    /usr/local/sbin/stallscope-rxe-up /usr/local/sbin/stallscope-rxe-down \
    /usr/local/sbin/stallscope-netem

cat > /etc/stallscope-vm-guest <<'EOF'
# This machine is the stallscope kernel-probe test guest (vagrant/provision.sh).
# tests/vm/conftest.py collects tests/vm/guest/ only where this file exists.
EOF

# ---------------------------------------------------------------- checks
if [ "$in_chroot" = 1 ]; then
    log "done (image chroot)"
else
    running=$(uname -r)
    if [ ! -e "/lib/modules/$running/build" ]; then
        log "WARNING: no headers for the running kernel $running (the archive no longer"
        log "WARNING: carries them); a newer kernel with headers is installed: reboot"
        log "WARNING: (vagrant reload) before running BCC tests"
    fi
    log "done"
fi

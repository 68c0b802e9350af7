#!/bin/bash
# Build, or reuse, the offline stallscope kernel-probe test VM image.
#
# usage: vagrant/build-image.sh [--suite SUITE] [--print-dir]
#
# SUITE is the Debian release, and so the kernel, of the image (default bookworm):
#   bullseye  Debian 11, kernel 5.10      bookworm  Debian 12, kernel 6.1
#   trixie    Debian 13, kernel 6.12
# The vm tier boots one image per suite (the kernel matrix, tests/vm/conftest.py).
#
# Produces, in $STALLSCOPE_VM_CACHE (default /var/cache/stallscope-vm)/<suite>-<key>/:
#   rootfs.img      raw ext4 root filesystem (4 GiB, sparse), booted with snapshot=on
#   vmlinuz, initrd.img, kernel-release
#   build.log       full mmdebstrap/provision output
#   image.env       facts about the build (KERNEL_RELEASE=, BUILD_SECONDS=, ...)
# where <key> is the sha256 of this script, vagrant/provision.sh and the suite name
# together: an edit to either script rebuilds the images, anything else reuses them
# (the two newest images of each suite are kept, older ones pruned). The build happens in a temporary directory
# beside the final one and is renamed into place, so an interrupted build never
# leaves a half image; a lock serialises concurrent builds.
# Progress goes to stderr; the last line on stdout is the image directory.
# --print-dir prints that directory without building (it may not exist yet).
#
# Recipe: mmdebstrap --variant=minbase SUITE (+ SUITE-updates, SUITE-security) with only
# the boot essentials, provision.sh run in the chroot (the same script Vagrant
# runs), then the pieces that drive the VM headless:
#   stallscope-vm-run.service  at boot mounts the 9p share with mount_tag=host at
#       /stallscope-share (and, if the host offers it, the read-only repo share
#       mount_tag=repo at /stallscope), runs /stallscope-share/run.sh, writes
#       stdout, stderr and exit-code into the share, then powers the VM off.
#       Without a run.sh it leaves the VM up (serial console, root autologin).
# and finally `mkfs.ext4 -d` of the tree into rootfs.img (no loop device or mount).
# Needs root, mmdebstrap, e2fsprogs and access to a Debian mirror
# ($STALLSCOPE_DEBIAN_MIRROR, default http://deb.debian.org).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
provision=$here/provision.sh
cache_root=${STALLSCOPE_VM_CACHE:-/var/cache/stallscope-vm}
mirror=${STALLSCOPE_DEBIAN_MIRROR:-http://deb.debian.org}
suite=bookworm
image_size=4G
print_dir=0
usage() { echo "usage: $0 [--suite bullseye|bookworm|trixie] [--print-dir]" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --suite) [[ $# -ge 2 ]] || usage; suite=$2; shift 2 ;;
        --suite=*) suite=${1#--suite=}; shift ;;
        --print-dir) print_dir=1; shift ;;
        *) usage ;;
    esac
done
# The suites the recipe is known to build and boot (security suites are SUITE-security
# from bullseye on). Others may work but are not offered untested.
case $suite in bullseye|bookworm|trixie) ;; *) echo "build-image: unsupported suite '$suite'" >&2; usage ;; esac

key=$( (cat "$here/build-image.sh" "$provision"; echo "suite=$suite") | sha256sum | cut -d' ' -f1)
final=$cache_root/$suite-$key

if [[ $print_dir == 1 ]]; then
    echo "$final"
    exit 0
fi

t0=$SECONDS
progress() { printf '[build-image %4ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }

if [[ -f $final/image.env ]]; then
    progress "reusing $final"
    echo "$final"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap in root mode, $cache_root)"
for tool in mmdebstrap mkfs.ext4 sha256sum flock; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install mmdebstrap e2fsprogs util-linux coreutils)"
done

mkdir -p "$cache_root"
exec 9>"$cache_root/.build.lock"
if ! flock -n 9; then
    progress "another image build is running; waiting for it"
    flock 9
fi
if [[ -f $final/image.env ]]; then
    progress "reusing $final (built while waiting)"
    echo "$final"
    exit 0
fi

# Holding the lock, any build directory left is from a build that was killed.
rm -rf "$cache_root"/.build-*
work=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
chmod 0755 "$work"  # apt's _apt user downloads into it; readers of the image need it too
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
root=$work/root
log=$work/build.log

# ------------------------------------------------------------------ bootstrap
progress "mmdebstrap $suite (minbase + kernel), then provision.sh in the chroot (log: $log)"
# A small initramfs (only what mounts a virtio-blk ext4 root: 7 MB instead of 36)
# unpacks and boots seconds faster under emulation than Debian's MODULES=most one.
# Configured before the kernel package is installed, so its initramfs is built once.
# shellcheck disable=SC2016  # $1 is expanded by mmdebstrap's hook shell
initramfs_hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf "MODULES=list\nCOMPRESS=gzip\n" >"$1/etc/initramfs-tools/conf.d/stallscope.conf"
printf "%s\n" virtio_pci virtio_blk ext4 crc32c_generic crc32c_intel \
    >"$1/usr/share/initramfs-tools/modules.d/stallscope"'
# The archive key is named, not inferred (mmdebstrap would need gpg for that).
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $keyring ]] || die "$keyring not found (apt-get install debian-archive-keyring)"
sources=(
    "deb [signed-by=$keyring] $mirror/debian $suite main"
    "deb [signed-by=$keyring] $mirror/debian $suite-updates main"
    "deb [signed-by=$keyring] $mirror/debian-security $suite-security main"
)
# shellcheck disable=SC2016  # the hooks' $1 is the chroot, expanded by mmdebstrap's shell
if ! mmdebstrap --variant=minbase --mode=root --components=main \
        --include=linux-image-amd64,systemd-sysv,udev,kmod,netbase \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --essential-hook="$initramfs_hook" \
        --customize-hook="upload $provision /root/provision.sh" \
        --customize-hook='chroot "$1" env STALLSCOPE_PROVISION_CHROOT=1 sh /root/provision.sh' \
        --customize-hook='rm -f "$1/root/provision.sh"' \
        "$suite" "$root" "${sources[@]}" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    cp "$log" "$cache_root/failed-build.log"
    die "mmdebstrap failed (full log: $cache_root/failed-build.log)"
fi
progress "bootstrap done"

# ------------------------------------------------------------------ headless driver
echo stallscope-vm >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	stallscope-vm
::1		localhost ip6-localhost ip6-loopback
EOF
# The kernel mounts the root read-write (root=/dev/vda rw): nothing to fsck, no fstab.
: >"$root/etc/fstab"
chroot "$root" systemd-machine-id-setup >/dev/null 2>&1
chroot "$root" passwd --delete root >/dev/null

cat >"$root/usr/local/sbin/stallscope-vm-run" <<'EOF'
#!/bin/bash
# Run the host's script once per boot (stallscope-vm-run.service, see vagrant/build-image.sh).
# Share layout (host side, all written by this script except run.sh):
#   run.sh     the script to run (bash), working directory /stallscope if shared, else the share
#   started    written first: guest uptime when this service started (boot-to-shell time)
#   stdout, stderr, exit-code (written last: its presence means run.sh finished)
share=/stallscope-share
repo=/stallscope
say() { echo "stallscope-vm-run: $*" >/dev/console; }

mkdir -p "$share" "$repo"
modprobe -a 9pnet_virtio 9p
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host "$share"; then
    say "cannot mount the 9p share 'host' (qemu -virtfs ...,mount_tag=host); powering off"
    systemctl poweroff --force
    exit 1
fi
tags=$(cat /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null | tr '\0' '\n')
if grep -qx repo <<<"$tags"; then
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro repo "$repo" \
        || say "cannot mount the repo share (mount_tag=repo) at $repo"
fi

if [[ ! -f $share/run.sh ]]; then
    say "no run.sh in the share: leaving the VM up (root autologin on the serial console)"
    exit 0
fi

cut -d' ' -f1 /proc/uptime >"$share/started"
workdir=$share
mountpoint -q "$repo" && workdir=$repo
say "running run.sh in $workdir"
(cd "$workdir" && exec bash "$share/run.sh") >"$share/stdout" 2>"$share/stderr" </dev/null
rc=$?
echo "$rc" >"$share/exit-code.tmp" && mv "$share/exit-code.tmp" "$share/exit-code"
say "run.sh exited $rc; powering off"
sync
umount "$repo" 2>/dev/null
umount "$share"
# The root disk is a throwaway snapshot and the results are on the host: no need
# for an orderly shutdown (saves seconds under software emulation).
systemctl poweroff --force --force
EOF
chmod 0755 "$root/usr/local/sbin/stallscope-vm-run"

cat >"$root/etc/systemd/system/stallscope-vm-run.service" <<'EOF'
[Unit]
Description=stallscope: run the host's /stallscope-share/run.sh, then power off
After=basic.target systemd-modules-load.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/stallscope-vm-run
Environment=HOME=/root LANG=C.UTF-8 STALLSCOPE_VM_GUEST=1 PYTHONDONTWRITEBYTECODE=1
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/stallscope-vm-run.service \
    "$root/etc/systemd/system/multi-user.target.wants/stallscope-vm-run.service"

mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
# Nothing in the test VM needs these at boot; each costs time under emulation.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        e2scrub_reap.service fstrim.timer getty@tty1.service getty-static.service nfs-blkmap.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# ------------------------------------------------------------------ boot files, disk
release=$(basename "$(ls -d "$root"/lib/modules/*)")
[[ -f $root/boot/vmlinuz-$release && -f $root/boot/initrd.img-$release ]] \
    || die "kernel $release or its initrd missing in $root/boot"
cp "$root/boot/vmlinuz-$release" "$work/vmlinuz"
cp "$root/boot/initrd.img-$release" "$work/initrd.img"
echo "$release" >"$work/kernel-release"
progress "kernel $release; mkfs.ext4 -d into a $image_size raw image"
mkfs.ext4 -q -F -L stallscope-root -d "$root" "$work/rootfs.img" "$image_size" >>"$log" 2>&1 \
    || { tail -n 20 "$log" >&2; die "mkfs.ext4 -d failed"; }
rm -rf "$root"

cat >"$work/image.env" <<EOF
KEY=$key
SUITE=$suite
KERNEL_RELEASE=$release
BUILT_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
BUILD_SECONDS=$((SECONDS - t0))
EOF
mv -T "$work" "$final"
trap - EXIT
# Keep the two newest images of this suite (other checkouts or branches may still want
# theirs), and drop the images of the single-kernel recipe (named by the bare digest).
# Names are matched whole: "bullseye" and "bookworm" start with hex letters too.
# shellcheck disable=SC2012  # the names are suite-hexdigest or hexdigest
for old in $(ls -dt "$cache_root"/*/ | grep -E "/$suite-[0-9a-f]{64}/\$" | tail -n +3) \
        $(ls -d "$cache_root"/*/ | grep -E '/[0-9a-f]{64}/$'); do
    progress "pruning old image $old"
    rm -rf "$old"
done
progress "image ready in $((SECONDS - t0)) s: $final"
echo "$final"

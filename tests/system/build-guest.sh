#!/usr/bin/env bash
# Builds, once, the cached part of the system test's guest and prints its directory:
#   root.img   ext4 image of a Debian 12 minbase root with kernel 6.1 + headers, bcc,
#              scapy, dpkt and Open vSwitch 3.1.0 built from Debian's openvswitch-source
#              with --enable-usdt-probes (in /usr/local)
#   vmlinuz, initrd.img   the guest's kernel and initramfs, for qemu -kernel/-initrd
#   ovs-format  ovs-format.c built against the same OVS tree, on the host: OVS's own text
#               for actions and megaflows, the oracle of the actions decoder's tests
# The directory is keyed by a hash of this file and ovs-format.c: change the recipe, get
# a new guest.
# Runs as root; installs what the host needs with apt-get.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_ROOT=${UPCALL_SYSTEM_CACHE:-/var/cache/upcall-capture}
MIRROR=${UPCALL_SYSTEM_MIRROR:-http://deb.debian.org/debian}
RECIPE_HASH=$(cat "$HERE/build-guest.sh" "$HERE/ovs-format.c" | sha256sum | cut -c1-16)
OUT=$CACHE_ROOT/system-$RECIPE_HASH
say() { echo "build-guest: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "must run as root (debootstrap, chroot)"; exit 2; }

if [ -e "$OUT/complete" ]; then
    echo "$OUT"
    exit 0
fi

HOST_PACKAGES=(qemu-system-x86 debootstrap e2fsprogs ca-certificates
               gcc make libc6-dev python3 pkg-config libssl-dev libcap-ng-dev
               systemtap-sdt-dev tshark)
# The runtime side of the libraries OVS is configured against on the host.
GUEST_PACKAGES=(linux-image-amd64 linux-headers-amd64 initramfs-tools kmod iproute2
                iputils-ping procps python3 python3-bpfcc python3-scapy python3-dpkt
                libssl3 libcap-ng0)
OVS_PROGRAMS=(vswitchd/ovs-vswitchd ovsdb/ovsdb-server ovsdb/ovsdb-tool utilities/ovs-vsctl
              utilities/ovs-appctl utilities/ovs-dpctl utilities/ovs-ofctl)

install_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# Debian's OVS is built without USDT probes; openvswitch-source holds the same patched
# tree with configure already generated (apt-get source fails: no orig tarball).
build_ovs() {
    local tree=$OVS_TREE
    (cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root openvswitch-source >/dev/null)
    dpkg-deb -x "$WORK"/openvswitch-source_*.deb "$WORK/ovs-deb"
    tar -xzf "$WORK/ovs-deb/usr/src/openvswitch/openvswitch.tar.gz" -C "$WORK"
    say "configure OVS in $tree"
    (cd "$tree" && ./configure -q --enable-usdt-probes --prefix=/usr/local \
        --localstatedir=/var --sysconfdir=/etc >"$WORK/ovs-configure.log")
    # Building single programs skips automake's BUILT_SOURCES: make those first.
    local built
    built=$(cd "$tree" && printf 'print-built-sources:\n\t@echo $(BUILT_SOURCES)\n' |
            make -s -f Makefile -f - print-built-sources)
    say "make OVS ($(nproc) jobs)"
    (cd "$tree" && make -s -j"$(nproc)" $built >"$WORK/ovs-make.log" 2>&1 &&
        make -s -j"$(nproc)" "${OVS_PROGRAMS[@]}" >>"$WORK/ovs-make.log" 2>&1) ||
        { tail -n 30 "$WORK/ovs-make.log" >&2; exit 1; }
    readelf -n "$tree/vswitchd/ovs-vswitchd" | grep -q recv_upcall ||
        { say "ovs-vswitchd has no dpif_recv:recv_upcall USDT note"; exit 1; }
    # The oracle, linked with the static library ovs-vswitchd was built from, and what
    # libtool says that library needs.
    # (A libtool archive among them is linked as the static library it stands for.)
    local needs=() word
    for word in $(sed -n "s/^dependency_libs='\(.*\)'$/\1/p" "$tree/lib/libopenvswitch.la"); do
        case $word in
            *.la) needs+=("$(dirname "$word")/.libs/$(basename "$word" .la).a") ;;
            *) needs+=("$word") ;;
        esac
    done
    gcc -O1 -I"$tree" -I"$tree/include" -I"$tree/lib" -o "$WORK/ovs-format" \
        "$HERE/ovs-format.c" "$tree/lib/.libs/libopenvswitch.a" "${needs[@]}" ||
        { say "ovs-format did not build"; exit 1; }
}

install_ovs() {
    local p
    mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/usr/local/sbin" "$ROOTFS/usr/local/share/openvswitch"
    install -m 755 "$OVS_TREE/vswitchd/ovs-vswitchd" "$OVS_TREE/ovsdb/ovsdb-server" \
        "$ROOTFS/usr/local/sbin/"
    for p in "${OVS_PROGRAMS[@]}"; do
        case $p in vswitchd/*|ovsdb/ovsdb-server) ;; *) install -m 755 "$OVS_TREE/$p" "$ROOTFS/usr/local/bin/" ;; esac
    done
    install -m 644 "$OVS_TREE/vswitchd/vswitch.ovsschema" "$ROOTFS/usr/local/share/openvswitch/"
    # Every library the programs link must resolve inside the guest.
    if chroot "$ROOTFS" ldd /usr/local/sbin/ovs-vswitchd | grep -q "not found"; then
        chroot "$ROOTFS" ldd /usr/local/sbin/ovs-vswitchd >&2
        say "ovs-vswitchd misses libraries in the guest"; exit 1
    fi
}

build_rootfs() {
    say "debootstrap bookworm into $ROOTFS"
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
    cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
    # The root disk is virtio; ext4 and virtio_blk are modules in Debian's kernel.
    mkdir -p "$ROOTFS/etc/initramfs-tools"
    printf 'virtio_pci\nvirtio_blk\next4\n' >>"$ROOTFS/etc/initramfs-tools/modules"
    # debootstrap made the device nodes apt needs; only /proc is mounted in the chroot.
    mount -t proc proc "$ROOTFS/proc"
    MOUNTED=1
    say "apt-get install in the guest root: ${GUEST_PACKAGES[*]}"
    chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
        "apt-get update -q && apt-get install -y -q --no-install-recommends ${GUEST_PACKAGES[*]} \
         && apt-get clean" >"$WORK/guest-apt.log" 2>&1 ||
        { tail -n 30 "$WORK/guest-apt.log" >&2; exit 1; }
    umount "$ROOTFS/proc"
    MOUNTED=0
    echo upcall-guest >"$ROOTFS/etc/hostname"
    # init: the per-run disk (vdb) brings the test script and the project.
    cat >"$ROOTFS/sbin/upcall-system-init" <<'INIT'
#!/bin/sh
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /run-disk
if mount /dev/vdb /run-disk; then
    exec /bin/bash /run-disk/guest-init.sh
fi
echo "upcall-system-init: cannot mount the run disk /dev/vdb"
echo o >/proc/sysrq-trigger
INIT
    chmod 755 "$ROOTFS/sbin/upcall-system-init"
}

cleanup() {
    if [ "${MOUNTED:-0}" = 1 ]; then
        umount "$ROOTFS/proc" 2>/dev/null || true
    fi
    # Never into a mount that is still there.
    [ -n "${WORK:-}" ] && rm -rf --one-file-system "$WORK"
}

install_host_packages
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/build.lock"
flock 9
[ -e "$OUT/complete" ] && { echo "$OUT"; exit 0; }
WORK=$(mktemp -d "$CACHE_ROOT/build.XXXXXX")
ROOTFS=$WORK/rootfs
OVS_TREE=$WORK/openvswitch
trap cleanup EXIT
build_ovs &
OVS_PID=$!
build_rootfs
wait "$OVS_PID" || { say "OVS build failed"; exit 1; }
install_ovs
say "make the root image"
cp "$ROOTFS"/boot/vmlinuz-* "$WORK/vmlinuz"
cp "$ROOTFS"/boot/initrd.img-* "$WORK/initrd.img"
chmod 644 "$WORK/vmlinuz" "$WORK/initrd.img"
mkfs.ext4 -q -L upcall-root -d "$ROOTFS" "$WORK/root.img" 3G >&2
mkdir "$WORK/out"
mv "$WORK/root.img" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/ovs-format" "$WORK/out/"
touch "$WORK/out/complete"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
# Guests of older recipes are of no more use.
find "$CACHE_ROOT" -maxdepth 1 -name 'system-*' ! -path "$OUT" -exec rm -rf {} +
say "guest ready in $OUT"
echo "$OUT"

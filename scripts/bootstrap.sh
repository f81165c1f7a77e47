#!/usr/bin/env bash
# One-shot set-up for a fresh Debian 12 / Ubuntu machine, as root.
#   bash scripts/bootstrap.sh demo   install everything, capture from the replay source, show it
#   bash scripts/bootstrap.sh test   install everything, run the whole test suite
#   bash scripts/bootstrap.sh setup  install everything only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
say() { echo "bootstrap: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "must run as root (bcc needs it)"; exit 2; }

install_packages() {
    local pkgs=(python3-bpfcc python3-venv python3-pip gcc make libc6-dev systemtap-sdt-dev
                tshark libpcap-dev binutils procps man-db tmux "$@")
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# bcc compiles its C at run time against the running kernel's headers. Custom kernels
# often have none packaged: fall back to the distribution's generic headers, linked
# where bcc looks (BCC_KERNEL_SOURCE alone does not cope with Debian's split layout).
install_kernel_headers() {
    local mod=/lib/modules/$(uname -r)
    [ -e "$mod/build/include" ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        return 0
    fi
    say "no headers for kernel $(uname -r); falling back to the distribution's generic headers"
    apt-get install -y -q --no-install-recommends linux-headers-amd64 >/dev/null
    local arch common
    arch=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
    mkdir -p "$mod"
    ln -sfn "$arch" "$mod/build"
    ln -sfn "$common" "$mod/source"
}

# uprobes are created through tracefs; debugfs is where older tools look for it.
mount_tracefs() {
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
}

# Debian's python3 with --system-site-packages, so bcc (a distribution package, not on
# PyPI) imports inside the venv.
install_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]"
}

build_replay() {
    make -s -C samples/replay
}

setup() {
    install_packages "$@"
    install_kernel_headers
    mount_tracefs
    install_python
    build_replay
}

case "${1:-}" in
    setup) setup ;;
    demo)
        setup
        exec bash samples/demo.sh
        ;;
    test)
        # The port-name tests run a real ovs-vswitchd (userspace datapath) of their own.
        setup openvswitch-switch
        shift
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *) say "usage: bootstrap.sh setup|demo|test [pytest args]"; exit 2 ;;
esac

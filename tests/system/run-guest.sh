#!/usr/bin/env bash
# Boots the cached guest once with the working tree's upcall_capture and guest-init.sh,
# and leaves its results in OUT_DIR:
#   OUT_DIR/serial.log   the guest's console
#   OUT_DIR/results/     what guest-init.sh left (capture, OVS logs, tool stderr, status)
# Usage: run-guest.sh GUEST_DIR OUT_DIR   (GUEST_DIR is what build-guest.sh prints)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=$(cd "$HERE/../.." && pwd)
GUEST=$1
OUT=$2
TIMEOUT=${UPCALL_SYSTEM_TIMEOUT:-1800}
say() { echo "run-guest: $*" >&2; }

rm -rf "$OUT"
mkdir -p "$OUT"
# The per-run disk: this script's guest side and the project, from the working tree. The
# cached root disk is used read-only (qemu keeps its writes in a temporary snapshot).
RUN_TREE=$OUT/run-disk
mkdir -p "$RUN_TREE/opt/upcall-capture" "$RUN_TREE/results"
cp "$HERE/guest-init.sh" "$RUN_TREE/"
(cd "$PROJECT" && tar --exclude=__pycache__ -cf - upcall_capture) |
    tar -xf - -C "$RUN_TREE/opt/upcall-capture"
mkfs.ext4 -q -L upcall-run -d "$RUN_TREE" "$OUT/run.img" 512M >/dev/null

say "booting the guest (timeout ${TIMEOUT}s, console in $OUT/serial.log)"
qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2G -smp 2 -nographic -no-reboot \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" \
    -append "console=ttyS0 root=/dev/vda rw init=/sbin/upcall-system-init panic=-1 loglevel=4" \
    -drive "file=$GUEST/root.img,format=raw,if=virtio,snapshot=on" \
    -drive "file=$OUT/run.img,format=raw,if=virtio" \
    -serial "file:$OUT/serial.log" -monitor none </dev/null &
QEMU_PID=$!
waited=0
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if [ $waited -ge "$TIMEOUT" ]; then
        say "guest still running after ${TIMEOUT}s: killing qemu"
        kill "$QEMU_PID"
        break
    fi
    sleep 1
    waited=$((waited + 1))
done
wait "$QEMU_PID" || true
say "guest ran ${waited}s"
debugfs -R "rdump /results $OUT" "$OUT/run.img" >/dev/null 2>&1
rm -rf "$RUN_TREE"
[ -e "$OUT/results/status" ] || { say "the guest left no status"; exit 1; }

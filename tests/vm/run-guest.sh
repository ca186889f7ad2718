#!/usr/bin/env bash
# Boots the guest from build-guest.sh under QEMU with one vhost-user-blk disk (/dev/vda in the
# guest) and runs a shell script inside it.  Prints the guest console; exits with the script's
# exit status (125: the guest reported no status, e.g. a kernel panic or QEMU failing to start;
# 124: TIMEOUT expired).
#
# Usage: tests/vm/run-guest.sh GUESTDIR SOCKET SCRIPT [QUEUES] [TIMEOUT_S]
#   GUESTDIR  output of build-guest.sh (vmlinuz, initramfs.img)
#   SOCKET    the backend's vhost-user socket (QEMU connects to it as the front-end)
#   SCRIPT    shell script run as /run.sh inside the guest (busybox sh, fio available)
#   QUEUES    virtio-blk queues (num-queues), default 1
#   TIMEOUT_S wall-clock limit for the whole VM, default 300
#
# Environment:
#   GUEST_CMDLINE  extra kernel command-line words, readable by SCRIPT from /proc/cmdline
#                  (e.g. "ubiblk.size=268435456 ubiblk.queues=2")
#   GUEST_MEM (1G), GUEST_CPUS (2), GUEST_APPEND (default "quiet"), GUEST_CONSOLE_LOG (path:
#   keep a copy of the console), QEMU (qemu-system-x86_64 binary)
#   CHARDEV_OPTS   appended to the disk's -chardev, e.g. ",reconnect-ms=500" (QEMU >= 9.2) so
#                  that QEMU reconnects when the backend restarts
#   USE_KVM=1      use KVM when /dev/kvm is usable.  Default is TCG: the Debian 6.1 kernel hangs
#                  early in boot under KVM on the project's machines.  NO_KVM=1 forces TCG too.
#
# Needs qemu-system-x86 (Debian), cpio, gzip.
set -euo pipefail

guest=${1:?usage: run-guest.sh GUESTDIR SOCKET SCRIPT [QUEUES] [TIMEOUT_S]}
sock=${2:?SOCKET}
script=${3:?SCRIPT}
nq=${4:-1}
limit=${5:-300}
mem=${GUEST_MEM:-1G}
cpus=${GUEST_CPUS:-2}
qemu=${QEMU:-qemu-system-x86_64}

die() { echo "run-guest: $*" >&2; exit 125; }

command -v "$qemu" >/dev/null ||
  die "$qemu not found: install qemu-system-x86 (see .ci/run; on bookworm take it from bookworm-backports to match qemu-utils 10)"
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"
[ -s "$guest/vmlinuz" ] && [ -s "$guest/initramfs.img" ] ||
  die "no guest in $guest: run tests/vm/build-guest.sh $guest"
[ -f "$script" ] || die "no script $script"
[ -S "$sock" ] || die "$sock is not a socket (is the backend running?)"

work=$(mktemp -d "${TMPDIR:-/tmp}/ubiblk-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/r"
cp "$script" "$work/r/run.sh"
chmod 755 "$work/r/run.sh"
# A second archive appended to the first overlays /run.sh onto the base initramfs.
(cd "$work/r" && echo run.sh | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$work/extra.cpio.gz"
cat "$guest/initramfs.img" "$work/extra.cpio.gz" >"$work/initrd"

accel=tcg cpu=max
if [ -n "${USE_KVM:-}" ] && [ -z "${NO_KVM:-}" ] && [ -w /dev/kvm ]; then
  accel=kvm cpu=${GUEST_CPU_MODEL:-host,-arch-capabilities}
fi
[ "$accel" = tcg ] && accel=tcg,thread=multi

# vhost-user needs guest RAM the backend can map: a shared memfd backend for all of RAM.
# -no-reboot + panic=-1: a guest panic ends QEMU instead of hanging until the timeout.
start=$(date +%s)
set +e
timeout -k 5 "$limit" "$qemu" -accel "$accel" -cpu "$cpu" -smp "$cpus" -m "$mem" \
  -object memory-backend-memfd,id=mem,size="$mem",share=on -machine q35,memory-backend=mem \
  -kernel "$guest/vmlinuz" -initrd "$work/initrd" \
  -append "console=ttyS0 ${GUEST_APPEND-quiet} panic=-1 mitigations=off ${GUEST_CMDLINE:-}" \
  -chardev socket,id=c0,path="$sock"${CHARDEV_OPTS:-} \
  -device vhost-user-blk-pci,chardev=c0,num-queues="$nq" \
  -display none -no-reboot -nodefaults -serial stdio -monitor none </dev/null 2>&1 |
  tee "$work/console" | tr -d '\r'
rcs=("${PIPESTATUS[@]}")
set -e
qrc=${rcs[0]}
[ -z "${GUEST_CONSOLE_LOG:-}" ] || cp "$work/console" "$GUEST_CONSOLE_LOG"
elapsed=$(($(date +%s) - start))

if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "run-guest: TIMEOUT after ${limit}s (accel=$accel)" >&2
  exit 124
fi
st=$(tr -d '\r' <"$work/console" | sed -n 's/^GUEST-EXIT-STATUS=\([0-9]*\).*/\1/p' | tail -n1)
if [ -z "$st" ]; then
  echo "run-guest: guest did not report an exit status (qemu exit code $qrc, ${elapsed}s)" >&2
  exit 125
fi
echo "run-guest: guest script exit status $st (${elapsed}s, accel=$accel, queues=$nq)" >&2
exit "$st"

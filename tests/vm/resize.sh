#!/bin/sh
# Runs INSIDE the test guest (busybox sh, see build-guest.sh) as /run.sh, for the online resize
# test (tests/guest/main.rs, guest_sees_its_disk_grow): checks the size of /dev/vda, writes a
# marker at offset 0 for the host to see (the host then sends `resize` on the backend's control
# socket), waits for the new size to show in /sys/block/vda/size, then writes and verifies the
# new area with fio.
#   ubiblk.size=BYTES      the size at boot
#   ubiblk.new_size=BYTES  the size after the resize
#   ubiblk.wait_s=N        how long to wait for the new size (default 120)
# The file passes `busybox sh -n`; keep it POSIX (no bash).

fail() { echo "RESIZE FAIL: $*"; exit 1; }
info() { echo "resize: $*"; }
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }

dev=/dev/vda
sys=/sys/block/vda
[ -b "$dev" ] || fail "$dev does not exist"
size=$(param ubiblk.size)
new=$(param ubiblk.new_size)
wait_s=$(param ubiblk.wait_s)
: "${wait_s:=120}"
[ -n "$size" ] && [ -n "$new" ] || fail "ubiblk.size and ubiblk.new_size are required"

bytes=$(($(cat $sys/size) * 512))
info "$dev: $bytes bytes at boot"
[ "$bytes" = "$size" ] || fail "size at boot is $bytes, expected $size"

# The marker: 4 KiB at offset 0, written with O_DIRECT so the host sees it in the file.
i=0; : >/tmp/marker
while [ $i -lt 256 ]; do printf 'RESIZE-READY-%03d\n' $i >>/tmp/marker; i=$((i + 1)); done
head -c 4096 /tmp/marker >/tmp/m && mv /tmp/m /tmp/marker
dd if=/tmp/marker of=$dev bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null ||
  fail "cannot write the marker"
info "marker written; waiting up to ${wait_s}s for $new bytes"

t=0
while :; do
  bytes=$(($(cat $sys/size) * 512))
  [ "$bytes" = "$new" ] && break
  [ "$bytes" = "$size" ] || fail "size changed to $bytes, expected $new"
  [ $t -ge $((wait_s * 10)) ] && fail "size still $bytes after ${wait_s}s, expected $new"
  sleep 0.1
  t=$((t + 1))
done
info "new size seen after about $((t / 10)).$((t % 10))s: $bytes bytes"
dmesg | grep -i "new size" | tail -n1

# Past the new end: nothing; the last block of the new area: readable and writable.
last=$((new / 4096 - 1))
n=$(dd if=$dev bs=4096 skip=$((last + 1)) count=1 2>/dev/null | wc -c)
[ "$n" = 0 ] || fail "read past the new end returned $n bytes"
dd if=/tmp/marker of=$dev bs=4096 seek=$last count=1 oflag=direct conv=notrunc 2>/dev/null ||
  fail "cannot write the last block of the new area"
dd if=$dev of=/tmp/back bs=4096 skip=$last count=1 iflag=direct 2>/dev/null ||
  fail "cannot read back the last block"
if ! cmp -s /tmp/marker /tmp/back; then
  ls -l /tmp/marker /tmp/back
  od -A d -c /tmp/back | head -n 4
  fail "the last block reads back differently"
fi
# The first block of the new area reads as zeros before anything is written there.
dd if=$dev of=/tmp/first bs=4096 skip=$((size / 4096)) count=1 iflag=direct 2>/dev/null ||
  fail "cannot read the first block of the new area"
head -c 4096 /dev/zero >/tmp/zero
cmp -s /tmp/first /tmp/zero || fail "the new area does not read as zeros"

# fio over the new area (its first 16 MiB, two jobs of 8 MiB), crc32c-verified.
fio --name=grown --filename=$dev --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
  --bsrange=4k-64k --size=8M --offset="$size" --offset_increment=8M --numjobs=2 \
  --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --exitall_on_error=1 \
  --end_fsync=1 || fail "fio write+verify of the new area failed"
info "PASS"
exit 0

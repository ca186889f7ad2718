#!/bin/sh
# Runs INSIDE the test guest (busybox sh) as /run.sh while the test live-migrates the guest
# (tests/vm/migrate.py): for ubiblk.fio_secs seconds (default 30), rounds of fio random writes
# verified with crc32c as they go (--verify_backlog), each followed by a read-only pass that
# verifies the round's blocks again (--verify_only). Reads land in guest memory only through
# the backend (no CPU writes those buffers), so a page the backend writes without marking it in
# the migration's dirty log reaches the destination stale and fails the verification.
# Keep it POSIX (busybox sh).

fail() { echo "FIO-MIGRATE FAIL: $*"; exit 1; }
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }

secs=$(param ubiblk.fio_secs)
: "${secs:=30}"
dev=/dev/vda
[ -b $dev ] || fail "$dev does not exist"
# Two jobs, one per CPU so that both queues carry I/O, each on its own 16 MiB.
common="--filename=$dev --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite
  --bsrange=4k-64k --size=16M --offset=0 --offset_increment=16M --numjobs=2 --group_reporting
  --verify=crc32c --verify_fatal=1 --exitall_on_error=1 --error_dump=1"
start=$(date +%s)
round=0
while [ $(($(date +%s) - start)) -lt "$secs" ]; do
  round=$((round + 1))
  # shellcheck disable=SC2086
  fio --name=write-$round $common --randseed=$round --do_verify=1 --verify_backlog=16 \
    >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "round $round (write)"; }
  # shellcheck disable=SC2086
  fio --name=read-$round $common --randseed=$round --verify_only=1 >/tmp/fio.out 2>&1 ||
    { cat /tmp/fio.out; fail "round $round (read-only verification)"; }
  echo "fio-migrate: round $round verified ($(($(date +%s) - start)) s)"
done
echo "fio-migrate: PASS ($round rounds)"
exit 0

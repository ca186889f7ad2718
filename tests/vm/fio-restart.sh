#!/bin/sh
# Runs INSIDE the test guest (busybox sh) as /run.sh while the test restarts the backend under
# it: rounds of fio random writes, each verified with crc32c (--verify_fatal), on /dev/vda for
# ubiblk.fio_secs seconds (default 45), then the last round's blocks verified once more. A
# restart must look like a pause: any I/O error or bad block fails the run.
# Each round uses its own random seed, so a write lost across a restart leaves an older round's
# data, which fails the verification. With ubiblk.read_pass=1 (live migration, see
# tests/vm/migrate.py) writes are verified as they go (--verify_backlog) and each round ends with
# a read-only pass over its blocks (--verify_only): those reads land in guest memory only
# through the backend, no CPU writes the buffers. Keep it POSIX (busybox sh).

fail() { echo "FIO-RESTART FAIL: $*"; exit 1; }
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }

secs=$(param ubiblk.fio_secs)
: "${secs:=45}"
read_pass=$(param ubiblk.read_pass)
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
  if [ "$read_pass" = 1 ]; then
    # shellcheck disable=SC2086
    fio --name=round-$round $common --randseed=$round --do_verify=1 --verify_backlog=16 \
      >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "round $round"; }
    # shellcheck disable=SC2086
    fio --name=read-$round $common --randseed=$round --verify_only=1 >/tmp/fio.out 2>&1 ||
      { cat /tmp/fio.out; fail "round $round (read-only pass)"; }
  else
    # shellcheck disable=SC2086
    fio --name=round-$round $common --randseed=$round --do_verify=1 >/tmp/fio.out 2>&1 ||
      { cat /tmp/fio.out; fail "round $round"; }
  fi
  echo "fio-restart: round $round verified ($(($(date +%s) - start)) s)"
done
# shellcheck disable=SC2086
fio --name=final $common --randseed=$round --verify_only=1 >/tmp/fio.out 2>&1 ||
  { cat /tmp/fio.out; fail "final verification of round $round"; }
echo "fio-restart: PASS ($round rounds)"
exit 0

#!/bin/sh
# Runs INSIDE the test guest (busybox sh, see build-guest.sh) as /run.sh.
# Checks what the guest sees of the vhost-user-blk disk /dev/vda, then writes it with fio and
# verifies every block with crc32c.  Exits non-zero on the first failure.
#
# Parameters come from the kernel command line (run-guest.sh: GUEST_CMDLINE="..."), or from the
# environment variable of the same name in capitals with '.' -> '_' (UBIBLK_SIZE, ...):
#   ubiblk.size=BYTES       required: expected size of /dev/vda in bytes
#   ubiblk.queues=N         expected number of blk-mq hardware queues (/sys/block/vda/mq/*)
#   ubiblk.max_segments=N   expected queue/max_segments      (backend seg_count_max)
#   ubiblk.max_seg_size=N   expected queue/max_segment_size  (backend seg_size_max)
#   ubiblk.ro=0|1           expected read-only flag (default 0; with 1 only reads are tested)
#   ubiblk.fio_size=SIZE    bytes each fio job writes (default 32M)
#   ubiblk.fio_bs=RANGE     fio bsrange (default 4k-64k)
# The file passes `busybox sh -n`; keep it POSIX (no bash).

fail() { echo "FIO-VERIFY FAIL: $*"; exit 1; }
info() { echo "fio-verify: $*"; }

# param NAME: value of NAME=... from the environment or /proc/cmdline (last one wins).
param() {
  envname=$(echo "$1" | tr 'a-z.' 'A-Z_')
  eval "v=\${$envname:-}"
  if [ -z "$v" ]; then
    v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1)
  fi
  echo "$v"
}

dev=/dev/vda
sys=/sys/block/vda
[ -b "$dev" ] || fail "$dev does not exist (virtio-blk device not found)"

size=$(param ubiblk.size)
queues=$(param ubiblk.queues)
maxsegs=$(param ubiblk.max_segments)
maxseg=$(param ubiblk.max_seg_size)
ro=$(param ubiblk.ro)
fio_size=$(param ubiblk.fio_size)
fio_bs=$(param ubiblk.fio_bs)
: "${ro:=0}" "${fio_size:=32M}" "${fio_bs:=4k-64k}"

# --- What the guest sees. ---
sectors=$(cat $sys/size)
bytes=$((sectors * 512))
lbs=$(cat $sys/queue/logical_block_size)
info "$dev: $bytes bytes ($sectors sectors), logical block $lbs, ro=$(cat $sys/ro)," \
  "hw queues $(ls $sys/mq | wc -l), max_segments $(cat $sys/queue/max_segments)," \
  "max_segment_size $(cat $sys/queue/max_segment_size), cpus $(grep -c ^processor /proc/cpuinfo)"

[ -n "$size" ] || fail "expected size not given (ubiblk.size=BYTES on the kernel command line)"
[ "$bytes" = "$size" ] || fail "size of $dev is $bytes bytes, expected $size"
[ "$(cat $sys/ro)" = "$ro" ] || fail "read-only flag is $(cat $sys/ro), expected $ro"
if [ -n "$queues" ]; then
  nq=$(ls $sys/mq | wc -l)
  [ "$nq" = "$queues" ] || fail "$dev has $nq hardware queues, expected $queues"
fi
if [ -n "$maxsegs" ]; then
  v=$(cat $sys/queue/max_segments)
  [ "$v" = "$maxsegs" ] || fail "max_segments is $v, expected $maxsegs"
fi
if [ -n "$maxseg" ]; then
  v=$(cat $sys/queue/max_segment_size)
  [ "$v" = "$maxseg" ] || fail "max_segment_size is $v, expected $maxseg"
fi

# --- Edges of the device. ---
last=$((bytes / 4096 - 1))
dd if=$dev of=/dev/null bs=4096 skip=$last count=1 2>/dev/null || fail "cannot read the last 4 KiB block"
n=$(dd if=$dev bs=4096 skip=$((last + 1)) count=1 2>/dev/null | wc -c)
[ "$n" = 0 ] || fail "read past the end of $dev returned $n bytes"

if [ "$ro" = 1 ]; then
  fio --name=ro-read --filename=$dev --readonly --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randread --bsrange="$fio_bs" --size="$fio_size" --numjobs=2 --group_reporting \
    || fail "fio read-only run failed"
  info "PASS (read-only)"
  exit 0
fi

# The last block: write a pattern with O_DIRECT, read it back.
pat=/tmp/pat
i=0; : >$pat
while [ $i -lt 256 ]; do printf 'ubiblk-edge-%03d\n' $i >>$pat; i=$((i + 1)); done  # 4096 bytes
dd if=$pat of=$dev bs=4096 seek=$last count=1 oflag=direct conv=notrunc 2>/dev/null ||
  fail "cannot write the last 4 KiB block"
echo 3 >/proc/sys/vm/drop_caches
dd if=$dev of=/tmp/back bs=4096 skip=$last count=1 iflag=direct 2>/dev/null ||
  fail "cannot read back the last 4 KiB block"
cmp -s $pat /tmp/back || fail "last 4 KiB block read back differs from what was written"

# --- fio: random writes of mixed sizes, crc32c-verified, one job per CPU (so both queues are
# used); each job owns its own region of the disk so that verification is exact. ---
# Region per job: fio_size rounded up to MiB, jobs placed back to back from offset 0.
fio_common="--filename=$dev --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1
  --numjobs=2 --group_reporting --exitall_on_error=1 --error_dump=1"
# shellcheck disable=SC2086
fio --name=randwrite-verify $fio_common --ioengine=libaio --iodepth=16 --rw=randwrite \
  --bsrange="$fio_bs" --size="$fio_size" --offset=0 --offset_increment="$fio_size" \
  --end_fsync=1 || fail "fio randwrite+verify (libaio) failed"
# shellcheck disable=SC2086
fio --name=seqwrite-verify $fio_common --ioengine=psync --rw=write \
  --bssplit=4k/40:16k/30:64k/20:128k/10 --size="$fio_size" --offset=0 \
  --offset_increment="$fio_size" --fsync=16 || fail "fio seqwrite+verify (psync) failed"
# Re-verify the last run's data from a fresh job (reads only): what was written is still there.
# shellcheck disable=SC2086
fio --name=reverify $fio_common --ioengine=libaio --iodepth=8 --rw=write \
  --bssplit=4k/40:16k/30:64k/20:128k/10 --size="$fio_size" --offset=0 \
  --offset_increment="$fio_size" --verify_only=1 || fail "fio re-verify (verify_only) failed"

info "PASS"
exit 0

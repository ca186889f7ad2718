#!/usr/bin/env bash
# Builds a minimal Linux guest for the end-to-end tests of the vhost-user-blk backend:
# a Debian kernel plus a busybox initramfs that carries fio.  Debian packages only.
#
# Usage: tests/vm/build-guest.sh OUTDIR
#   -> OUTDIR/vmlinuz, OUTDIR/initramfs.img (and OUTDIR/kernel-version, OUTDIR/.recipe)
#
# Idempotent: when OUTDIR already holds vmlinuz + initramfs.img built by this same recipe (the
# script's sha256, kept in OUTDIR/.recipe) the script does nothing (FORCE=1 rebuilds).  The result is written to a temporary directory and
# moved into place only when complete, and concurrent callers serialise on a lock file, so an
# interrupted or parallel build never leaves a half-built guest behind.
#
# Needs (Debian packages): busybox-static, fio, cpio, zstd (or gzip), xz-utils, and apt lists
# (`apt-get update`) so that `apt-get download linux-image-amd64` works.  Nothing is installed
# here: .ci/run installs the packages.  KERNEL_DEB=/path/to/linux-image-*.deb skips the download.
#
# The guest's /init loads the virtio modules, waits for /dev/vda, runs /run.sh (appended by
# run-guest.sh as a second cpio archive), prints "GUEST-EXIT-STATUS=<rc>" and powers off.
set -euo pipefail

out=${1:?usage: build-guest.sh OUTDIR}
recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)

die() { echo "build-guest: $*" >&2; exit 1; }

is_built() {
  [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.img" ] &&
    [ -f "$out/.recipe" ] && [ "$(cat "$out/.recipe")" = "$recipe" ]
}

mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "${FORCE:-}" ] && is_built; then
  echo "build-guest: $out is up to date ($(cat "$out/kernel-version" 2>/dev/null || echo '?'))"
  exit 0
fi

# Serialise concurrent builds of the same OUTDIR (e.g. several test binaries at once).
exec 9>"$out/.lock"
flock 9
if [ -z "${FORCE:-}" ] && is_built; then
  echo "build-guest: $out was built by a concurrent caller"
  exit 0
fi

missing=()
busybox_bin=
for b in /bin/busybox /usr/bin/busybox "$(command -v busybox || true)"; do
  # Only a static busybox works in the initramfs without its libraries.
  if [ -n "$b" ] && [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then busybox_bin=$b; break; fi
done
[ -n "$busybox_bin" ] || missing+=(busybox-static)
command -v fio >/dev/null || missing+=(fio)
command -v cpio >/dev/null || missing+=(cpio)
command -v xz >/dev/null || missing+=(xz-utils)
command -v zstd >/dev/null || missing+=(zstd)
command -v apt-get >/dev/null || die "apt-get not found: this recipe needs Debian"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this recipe needs Debian"
if ((${#missing[@]})); then
  die "missing tools; install them with: apt-get install -y ${missing[*]}   (or run .ci/run)"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ubiblk-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- Kernel: the Debian linux-image for this release, unpacked (not installed). ---
mkdir -p "$work/deb" "$work/kroot"
if [ -n "${KERNEL_DEB:-}" ]; then
  cp "$KERNEL_DEB" "$work/deb/"
else
  (
    cd "$work/deb"
    apt_dl() { apt-get -q -o APT::Sandbox::User=root download "$@" >"$work/apt.log" 2>&1; }
    if ! apt_dl linux-image-amd64; then
      # Stale or missing package lists: refresh them once if we may.
      [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt_dl linux-image-amd64 ||
        die "apt-get download linux-image-amd64 failed (run apt-get update): $(tail -n3 "$work/apt.log")"
    fi
    dep=$(dpkg-deb -f linux-image-amd64_*.deb Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1)
    [ -n "$dep" ] || die "cannot find the kernel package linux-image-amd64 depends on"
    rm -f linux-image-amd64_*.deb
    apt_dl "$dep" || die "apt-get download $dep failed: $(tail -n3 "$work/apt.log")"
  )
fi
deb=$(ls "$work"/deb/linux-image-*.deb | head -n1)
dpkg-deb -x "$deb" "$work/kroot"
kver=$(ls "$work/kroot/lib/modules" | head -n1)
[ -n "$kver" ] && [ -f "$work/kroot/boot/vmlinuz-$kver" ] || die "no kernel found in $deb"
moddir=$work/kroot/lib/modules/$kver

# --- Root file system. ---
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules,usr/bin,usr/sbin}
cp "$busybox_bin" "$root/bin/busybox"

# Modules the virtio-blk disk needs, in load order (the deb ships no modules.dep; /init retries
# anyway, so a changed order costs only a retry); those built into this kernel are skipped.
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
loaded=
for m in $mods; do
  f=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.*" | head -n1)
  if [ -z "$f" ]; then
    grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null ||
      die "kernel $kver has neither a module nor a built-in $m"
    continue
  fi
  case $f in
    *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  loaded="$loaded $m"
done

# fio and the shared libraries it links (and the dynamic loader), at their own paths.
fio_bin=$(command -v fio)
cp "$fio_bin" "$root/usr/bin/fio"
for lib in $(ldd "$fio_bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Debian's usrmerge: /lib and /lib64 are symlinks on the host; the copies above created real
# directories, which is fine because the loader path in fio is absolute.

cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# Load the modules; retry failed ones in case a dependency came later in the list.
left="$loaded"
for pass in 1 2 3 4 5 6; do
  again=
  for m in \$left; do insmod /lib/modules/\$m.ko 2>/dev/null || again="\$again \$m"; done
  left=\$again
  [ -z "\$left" ] && break
done
for m in \$left; do insmod /lib/modules/\$m.ko || echo "init: insmod \$m failed"; done
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 200 ]; do sleep 0.1; i=\$((i+1)); done
[ -b /dev/vda ] || echo "init: /dev/vda did not appear"
rc=0
if [ -x /run.sh ]; then /run.sh; rc=\$?; else echo "init: no /run.sh"; rc=1; fi
sync
echo "GUEST-EXIT-STATUS=\$rc"
poweroff -f
INIT
chmod +x "$root/init"

# Base initramfs: zstd decompresses much faster than gzip under TCG (Debian kernels have
# CONFIG_RD_ZSTD); run-guest.sh appends a gzip'ed cpio, and the kernel handles mixed segments.
stage=$work/out
mkdir -p "$stage"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | zstd -q -T0 -3) >"$stage/initramfs.img"
cp "$work/kroot/boot/vmlinuz-$kver" "$stage/vmlinuz"
echo "$kver" >"$stage/kernel-version"
echo "$recipe" >"$stage/.recipe"
# .recipe goes last: a guest without a matching .recipe is never taken as built.
rm -f "$out/.recipe"
for f in vmlinuz initramfs.img kernel-version .recipe; do mv -f "$stage/$f" "$out/$f"; done
echo "build-guest: kernel $kver, modules:${loaded:- none} -> $out/vmlinuz, $out/initramfs.img ($(du -h "$out/initramfs.img" | cut -f1))"

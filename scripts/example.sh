#!/usr/bin/env bash
# Runs vhost-backend on a bundled example configuration, creating its files first:
#   scripts/example.sh        examples/vhost-backend.yaml: a 1 GiB sparse disk
#   scripts/example.sh lazy   examples/lazy.yaml: a 1 GiB disk filled lazily from a 256 MiB
#                             image, with autofetch and a control socket
# Its files (disk, image, metadata, sockets, the config it serves) live in
# $UBIBLK_EXAMPLE_DIR, default /tmp/ubiblk-example: the example's config with its paths moved
# there is written as DIR/vhost-backend.yaml or DIR/lazy.yaml. One example runs per directory
# (a second one on the same directory is refused before it touches a file); use another
# directory to run two at once. Attach a VMM to DIR/vhost.sock (see README); Ctrl-C stops it
# cleanly and leaves the disk (and image and metadata) for the next run.
set -euo pipefail
default_dir=/tmp/ubiblk-example
dir=${UBIBLK_EXAMPLE_DIR:-$default_dir}
case "$dir" in
*[\"\\]* | *$'\n'*)
    echo "$0: UBIBLK_EXAMPLE_DIR must not contain a double quote, a backslash or a newline" >&2
    exit 2
    ;;
esac
mode=${1:-plain}
case "$mode" in
plain | lazy) ;;
*)
    echo "usage: [UBIBLK_EXAMPLE_DIR=DIR] $0 [plain|lazy]" >&2
    exit 2
    ;;
esac
mkdir -p "$dir"
dir=$(cd "$dir" && pwd) # absolute: the config is used from the repository root
cd "$(dirname "$0")/.."

# One example per directory: the lock is held by the backend itself (the descriptor survives
# the exec below) and released when it exits, however it exits.
exec 9>>"$dir/example.lock"
if ! flock -n 9; then
    echo "$0: another example is running on $dir (it holds $dir/example.lock);" \
        "stop it, or run this one elsewhere: UBIBLK_EXAMPLE_DIR=/tmp/ubiblk-example2 $0 $mode" >&2
    exit 1
fi

# The bundled config with /tmp/ubiblk-example replaced by $dir (escaped for sed).
config="$dir/$([ "$mode" = lazy ] && echo lazy.yaml || echo vhost-backend.yaml)"
sed "s|$default_dir|$(printf '%s' "$dir" | sed 's/[&|\\]/\\&/g')|g" \
    "examples/$(basename "$config")" >"$config"

case "$mode" in
plain)
    cargo build --release --bin vhost-backend
    [ -e "$dir/disk.raw" ] || truncate -s 1G "$dir/disk.raw"
    echo "serving $dir/disk.raw on $dir/vhost.sock"
    ;;
lazy)
    cargo build --release --bin vhost-backend --bin init-metadata
    if [ ! -e "$dir/lazy.meta" ]; then
        # Any file works as an image; this one is recognisable data.
        if [ ! -e "$dir/image.raw" ]; then
            head -c 256M /dev/urandom >"$dir/image.raw.part"
            mv "$dir/image.raw.part" "$dir/image.raw"
        fi
        # No metadata: the base disk holds nothing fetched; start it empty.
        rm -f "$dir/lazy-disk.raw"
        truncate -s 1G "$dir/lazy-disk.raw"
        target/release/init-metadata --config "$config"
    fi
    echo "serving $dir/image.raw lazily through $dir/lazy-disk.raw on $dir/vhost.sock"
    echo "progress: echo status | socat - UNIX-CONNECT:$dir/control.sock"
    echo "      or: echo status | nc -UN $dir/control.sock   (Debian: netcat-openbsd)"
    ;;
esac
exec env RUST_LOG="${RUST_LOG:-info}" target/release/vhost-backend --config "$config"

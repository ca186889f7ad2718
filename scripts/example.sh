#!/usr/bin/env bash
# Runs vhost-backend on a bundled example configuration, creating its files first:
#   scripts/example.sh        examples/vhost-backend.yaml: a 1 GiB sparse disk
#   scripts/example.sh lazy   examples/lazy.yaml: a 1 GiB disk filled lazily from a 256 MiB
#                             image, with autofetch and a control socket
# Attach a VMM to /tmp/ubiblk-example/vhost.sock (see README); Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=/tmp/ubiblk-example
mkdir -p "$dir"
case "${1:-plain}" in
plain)
    config=examples/vhost-backend.yaml
    cargo build --release --bin vhost-backend
    [ -e "$dir/disk.raw" ] || truncate -s 1G "$dir/disk.raw"
    echo "serving $dir/disk.raw on $dir/vhost.sock"
    ;;
lazy)
    config=examples/lazy.yaml
    cargo build --release --bin vhost-backend --bin init-metadata
    if [ ! -e "$dir/lazy.meta" ]; then
        # Any file works as an image; this one is recognisable data.
        [ -e "$dir/image.raw" ] || head -c 256M /dev/urandom >"$dir/image.raw"
        rm -f "$dir/lazy-disk.raw"
        truncate -s 1G "$dir/lazy-disk.raw"
        target/release/init-metadata --config "$config"
    fi
    echo "serving $dir/image.raw lazily through $dir/lazy-disk.raw on $dir/vhost.sock"
    echo "progress: echo status | socat - UNIX-CONNECT:$dir/control.sock"
    ;;
*)
    echo "usage: $0 [plain|lazy]" >&2
    exit 2
    ;;
esac
exec env RUST_LOG="${RUST_LOG:-info}" target/release/vhost-backend --config "$config"

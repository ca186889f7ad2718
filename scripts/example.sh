#!/usr/bin/env bash
# Runs vhost-backend on examples/vhost-backend.yaml, creating its 1 GiB sparse disk first.
# Attach a VMM to /tmp/ubiblk-example/vhost.sock (see README); Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/ubiblk-example
[ -e /tmp/ubiblk-example/disk.raw ] || truncate -s 1G /tmp/ubiblk-example/disk.raw
cargo build --release --bin vhost-backend
echo "serving /tmp/ubiblk-example/disk.raw on /tmp/ubiblk-example/vhost.sock"
exec env RUST_LOG="${RUST_LOG:-info}" target/release/vhost-backend --config examples/vhost-backend.yaml

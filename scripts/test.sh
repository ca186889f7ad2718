#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit + integration + real-guest tests, and a
# short bounded fuzz run. Needs the packages .ci/run installs (QEMU, fio, busybox-static, cpio).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
cargo test --release
if [ -x fuzz/run.sh ]; then fuzz/run.sh "${UBIBLK_FUZZ_SECONDS:-20}"; fi

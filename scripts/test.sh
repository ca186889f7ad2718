#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit + integration + real-guest tests, and a
# short bounded fuzz run. Needs the packages .ci/run installs (QEMU, fio, busybox-static, cpio).
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests that need a tool (QEMU, nginx, Garage, a Python module, ...) skip without it under a
# plain `cargo test`; here every one is mandatory and a missing tool fails its test.
export UBIBLK_REQUIRE_ALL=1
cargo fmt --check
# The layout rules (docs/architecture.md, "Modules"): no import cycle between top-level modules,
# at most 6 .rs files directly in src/, no file over 700 lines before its tests.
./scripts/structure-check
cargo clippy --all-targets -- -D warnings
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
cargo test --release
if [ -x fuzz/run.sh ]; then fuzz/run.sh "${UBIBLK_FUZZ_SECONDS:-20}"; fi

#!/usr/bin/env bash
# Fuzzes virtio-blk request parsing (fuzz_targets/parse_request.rs) for a bounded time.
#
#   fuzz/run.sh [SECONDS]      default 20; exits non-zero when the target crashes or hangs
#
# Environment: FUZZ_SANITIZER=address|none (default address), FUZZ_JOBS=N cargo build jobs.
# New corpus entries go to fuzz/corpus/parse_request (gitignored); the checked-in seeds in
# fuzz/seeds/parse_request (made by gen_seeds.py) are read too. A crash input is written to
# fuzz/artifacts/parse_request/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run parse_request fuzz/artifacts/parse_request/crash-...
set -euo pipefail

secs=${1:-20}
case $secs in '' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac
sanitizer=${FUZZ_SANITIZER:-address}
fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$fuzz_dir/.."

# cargo-fuzz passes nightly-only -Z flags (sanitizer, coverage instrumentation) to rustc;
# this lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
    cargo fuzz --version
fi

build_args=(parse_request --sanitizer "$sanitizer")
if [ -n "${FUZZ_JOBS:-}" ]; then
    # cargo fuzz's own -j means libFuzzer jobs; the compile jobs go through cargo's variable.
    export CARGO_BUILD_JOBS=$FUZZ_JOBS
fi
cargo fuzz build "${build_args[@]}"

mkdir -p fuzz/corpus/parse_request
# -timeout: a single input running this long is a hang (fails the run);
# -rss_limit_mb: ASan's quarantine alone takes ~256 MiB, stay well above it.
exec cargo fuzz run "${build_args[@]}" \
    fuzz/corpus/parse_request fuzz/seeds/parse_request -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1

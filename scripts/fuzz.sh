#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each): scripts/fuzz.sh [SECONDS].
# Needs cargo-fuzz (cargo install cargo-fuzz) and a nightly toolchain (rustup toolchain install
# nightly). Crashes land in fuzz/artifacts/<target>/; fix them and keep the input as a regression
# test in the crate it hit.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
for target in agent_message report_request config cursor rules; do
    echo "fuzzing $target for ${seconds}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
done

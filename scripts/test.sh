#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, builds every binary
# once (the system tests run them as separate processes), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo build --workspace --bins
cargo test --workspace --exclude nodekeeper-bench "$@"

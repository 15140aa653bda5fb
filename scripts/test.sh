#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, builds every binary
# once (the system tests run them as separate processes), then runs every test of the workspace,
# and the event center's suites once more on the PostgreSQL store.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo build --workspace --bins
cargo test --workspace --exclude nodekeeper-bench "$@"
# The event center's suites again with the centers on PostgreSQL (a throwaway cluster per test
# binary): both store engines keep the same promises.
NODEKEEPER_TEST_STORE=postgres cargo test -p nodekeeper-tests \
    --test eventcenter --test permits --test remediator --test kube_nodes --test rollouts --test security "$@"

#!/usr/bin/env bash
# Runs every test of flows: set-up (idempotent), then the whole workspace's tests.
# Kernel-touching tests need root; they run serially (one test thread, and a lock
# around each lab) and clean up after themselves even when they fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Anything a crashed earlier run left behind (namespaces, links, daemons).
if [ -x target/debug/flows ]; then target/debug/flows lab down >/dev/null 2>&1 || true; fi
cargo build --bins
cargo test --no-fail-fast -- --test-threads=1

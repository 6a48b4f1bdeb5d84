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
# A test that needs root fails rather than skips: a run without privileges must not pass.
export FLOWS_REQUIRE_ROOT=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --no-fail-fast --lib --bins --tests -- --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The house: no circle of files importing each other in any crate, and no function
# over ~120 lines outside tests.
set +e
python3 scripts/import-cycles.py && python3 scripts/long-functions.py --limit 125
house_status=$?
set -e
# Every fuzz target of the untrusted-input parsers, for a bounded time each.
fuzz_log=$(mktemp)
trap 'rm -f "$log" "$fuzz_log"' EXIT
set +e
bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}" 2>&1 | tee "$fuzz_log"
fuzz_status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run: cargo's tests (one line per test binary) plus
# the fuzz targets.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^fuzz: [0-9]+ passed, [0-9]+ failed/ { p += $2; f += $4 }
     END { printf "%d passed, %d failed\n", p, f }' "$log" "$fuzz_log"
[ "$status" -eq 0 ] || exit "$status"
[ "$house_status" -eq 0 ] || exit "$house_status"
exit "$fuzz_status"

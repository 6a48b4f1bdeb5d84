#!/usr/bin/env bash
# Runs every lab and kernel test N times, one at a time, and prints each test's pass
# rate: a test that fails one run in twenty fails CI, so it must pass 20 of 20 here.
# Usage: scripts/stress.sh N [FILTER]   (FILTER: only tests whose `binary::test` name
# contains it)
# Failing runs' output is kept in target/stress/<test>.<run>.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:?usage: scripts/stress.sh N [FILTER]}
filter=${2:-}
export FLOWS_REQUIRE_ROOT=1
cargo build --bins
# The test binaries that touch the kernel: they are the ones that need root.
mapfile -t bins < <(cargo test --no-run --message-format=json --tests 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    src = m["target"]["src_path"]
    if "/tests/" not in src:
        continue
    if "skip_unless_root" in open(src).read() or "fn root() -> bool" in open(src).read():
        print(m["executable"])
')
mkdir -p target/stress
summary=()
failed=0
for bin in "${bins[@]}"; do
    name=$(basename "$bin" | sed 's/-[0-9a-f]*$//')
    mapfile -t tests < <("$bin" --list --format=terse 2>/dev/null | sed -n 's/: test$//p')
    for t in "${tests[@]}"; do
        [[ -z "$filter" || "$name::$t" == *"$filter"* ]] || continue
        pass=0
        for ((i = 1; i <= runs; i++)); do
            log="target/stress/${t//[^A-Za-z0-9_]/_}.$i.log"
            if "$bin" --exact "$t" --test-threads=1 >"$log" 2>&1; then
                pass=$((pass + 1))
                rm -f "$log"
            else
                echo "FAIL $t run $i (log: $log)"
            fi
        done
        [ "$pass" -eq "$runs" ] || failed=1
        line=$(printf '%-60s %3d/%-3d %5.1f%%' "$name::$t" "$pass" "$runs" "$(awk -v p="$pass" -v n="$runs" 'BEGIN { print 100 * p / n }')")
        echo "$line"
        summary+=("$line")
    done
done
echo
echo "pass rates over $runs run(s):"
printf '%s\n' "${summary[@]}"
exit "$failed"

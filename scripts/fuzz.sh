#!/usr/bin/env bash
# Fuzzes flows' parsers of untrusted input for a bounded time (libFuzzer via cargo-fuzz,
# targets in fuzz/fuzz_targets/, seeds in fuzz/seeds/<target>/).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 30)
#
# Installs cargo-fuzz if missing, builds every target once with the pinned nightly, then
# runs each for SECONDS_PER_TARGET on a temporary corpus seeded from its seeds (or, when
# FUZZ_CORPUS_DIR is set, on $FUZZ_CORPUS_DIR/<target>, kept between runs). Exits non-zero
# when any target crashes, hangs (-timeout) or runs out of memory, naming the input and
# the command that reproduces it. Expects scripts/setup.sh to have run (the pinned
# nightly, protobuf-compiler for flows-proto). The decoder is its own crate
# (flows-parser), so no eBPF object is built for the fuzz targets.
# Env: FUZZ_TARGETS="decode jsonl" to run a subset; FUZZ_TARGET_DIR for the build
# (default fuzz/target; a kept one makes CI's build incremental); FUZZ_SANITIZER
# (default address; "none" builds faster and runs about twice as fast, but unsafe code,
# e.g. unsafe-libyaml under serde_yaml, is then unchecked); CARGO_BUILD_JOBS as for cargo.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-30}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;; esac

CARGO_FUZZ_VERSION="0.13.2"   # builds with stable 1.95; newer ones may need a newer rustc
# Several codegen units: the big crates (k8s-openapi users) build on every core. A run
# with other flags rebuilds everything, so reproduce with these too.
BUILD_FLAGS=(--codegen-units 8 --sanitizer "${FUZZ_SANITIZER:-address}")
target_dir="${FUZZ_TARGET_DIR:-$here/fuzz/target}"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
BUILD_FLAGS+=(--target-dir "$target_dir")
ALL_TARGETS="decode manifests netpol filter jsonl"
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"

log() { printf '[fuzz] %s\n' "$*" >&2; }

# Largest input per target: a few ring-buffer records; a manifest file; a line file.
max_len() {
  case "$1" in
    decode) echo 1024 ;;
    manifests | jsonl) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

# The nightly setup.sh provides (the image's `nightly` when it is the pinned date).
NIGHTLY="${FLOWS_NIGHTLY:-nightly}"
if ! rustc +"$NIGHTLY" --version 2>/dev/null | grep -q "2026-05-19"; then
  NIGHTLY="nightly-2026-05-20"
fi
rustc +"$NIGHTLY" --version >/dev/null 2>&1 || { echo "no $NIGHTLY toolchain: run scripts/setup.sh first" >&2; exit 1; }

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  log "cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo +stable install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked || exit 1
fi
# libfuzzer-sys compiles libFuzzer's C++ sources.
if ! command -v c++ >/dev/null; then
  log "apt-get install g++"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ >/dev/null; } || exit 1
fi

cd "$here"
log "building the fuzz targets ($NIGHTLY)"
start=$(date +%s)
if ! cargo +"$NIGHTLY" fuzz build "${BUILD_FLAGS[@]}"; then
  echo "fuzz: build failed"
  echo "fuzz: 0 passed, $(wc -w <<<"$TARGETS") failed"
  exit 1
fi
log "built in $(( $(date +%s) - start ))s"

bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
summary=()
for t in $TARGETS; do
  if [ -n "${FUZZ_CORPUS_DIR:-}" ]; then
    corpus="$FUZZ_CORPUS_DIR/$t"
  else
    corpus="$work/corpus/$t"
  fi
  mkdir -p "$corpus" "$here/fuzz/artifacts/$t"
  cp -n "$here/fuzz/seeds/$t/"* "$corpus/" 2>/dev/null || true
  out="$work/$t.log"
  dict=()
  [ -f "$here/fuzz/dicts/$t.dict" ] && dict=(-dict="$here/fuzz/dicts/$t.dict")
  log "$t: ${secs}s, max_len $(max_len "$t")"
  # Run the built binary itself: no rebuild, and the flags are exactly these.
  "$bin_dir/$t" "$corpus" \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len="$(max_len "$t")" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$here/fuzz/artifacts/$t/" "${dict[@]}" >"$out" 2>&1
  status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n1)
  cov=$(grep -o 'cov: [0-9]*' "$out" | tail -n1 | cut -d' ' -f2)
  corp=$(grep -o 'corp: [0-9]*' "$out" | tail -n1 | cut -d' ' -f2)
  line="$t: ${execs:-?} execs (${rate:-?}/s), cov ${cov:-?}, corpus ${corp:-?}"
  if [ "$status" -eq 0 ]; then
    passed=$((passed + 1))
    echo "$line: ok"
  else
    failed=$((failed + 1))
    echo "$line: FAILED (exit $status)"
    # libFuzzer's report: the panic or sanitizer message and the input it saved.
    grep -E -A25 '^(thread .* panicked|==[0-9]+==ERROR|ALARM: working on the last Unit|==[0-9]+== ERROR: libFuzzer)' "$out" | head -n 60
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$out" | tail -n1)
    if [ -n "$artifact" ]; then
      echo "$t: input saved as $artifact"
      echo "$t: reproduce with: $bin_dir/$t $artifact"
      echo "$t:   or (rebuilding as needed): cargo +$NIGHTLY fuzz run ${BUILD_FLAGS[*]} $t $artifact"
    else
      tail -n 30 "$out"
    fi
  fi
  summary+=("$line")
done
echo
printf '%s\n' "${summary[@]}"
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

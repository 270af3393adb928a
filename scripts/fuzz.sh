#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: every parser of untrusted input) for FUZZ_SECONDS each (default 20),
# with cargo fuzz (libFuzzer, AddressSanitizer) on the nightly toolchain, starting from the seeds in fuzz/seeds.
# Targets are built unoptimised (3 minutes here, against 9 for an optimised build); FUZZ_RELEASE=1 builds them
# optimised, for longer runs.
# A crash fails the script; libFuzzer writes the input to fuzz/artifacts/<target>/ (make it a regression test).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-20}"
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
profile=(--dev)
if [ -n "${FUZZ_RELEASE:-}" ]; then profile=(-O); fi
cargo +nightly fuzz build "${profile[@]}"
for t in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$t"
  if [ -d "seeds/$t" ]; then cp -n "seeds/$t"/* "corpus/$t/" || true; fi
  echo "== fuzz $t (${secs} s)"
  log="$(mktemp)"
  if ! cargo +nightly fuzz run "${profile[@]}" "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
    grep -E 'ERROR|SUMMARY|panicked|Test unit written' "$log" >&2 || tail -20 "$log" >&2
    echo "scripts/fuzz.sh: $t crashed; the input is in fuzz/artifacts/$t/ (make it a regression test)" >&2
    exit 1
  fi
  grep -E '^Done' "$log" || { tail -20 "$log" >&2; exit 1; }
  rm -f "$log"
done

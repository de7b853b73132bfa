#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS each,
# default 30) and fails on any finding. Part of the test command; also
# `bash scripts/fuzz.sh [target...]` by hand, e.g. FUZZ_SECONDS=600 for a
# longer hunt.
#
# cargo fuzz needs nightly compiler flags (-Zsanitizer); RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them. Builds go to target/fuzz, the
# growing corpus to target/fuzz/corpus (seeded from fuzz/seeds), crashes to
# target/fuzz/artifacts: reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --target-dir target/fuzz TARGET FILE
# and turn it into a regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked --quiet cargo-fuzz@0.13.2
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
cargo fuzz build --fuzz-dir fuzz --target-dir target/fuzz
for t in "${targets[@]}"; do
  corpus=target/fuzz/corpus/$t
  artifacts=target/fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  echo "fuzzing $t for ${seconds}s"
  # -max_len bounds inputs near the gateway's own frame limits; -rss_limit_mb
  # keeps a leak or a blow-up a finding instead of a machine problem.
  status=0
  cargo fuzz run --fuzz-dir fuzz --target-dir target/fuzz "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -max_len=8192 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$artifacts.log" 2>&1 || status=$?
  grep -E '^(Done|stat::peak_rss_mb)' "$artifacts.log" || true
  if [ "$status" -ne 0 ] || compgen -G "$artifacts/*" >/dev/null; then
    tail -40 "$artifacts.log" >&2
    echo "fuzz target $t failed (exit $status); inputs: $(ls "$artifacts")" >&2
    exit 1
  fi
done

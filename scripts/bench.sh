#!/usr/bin/env bash
# Runs the benchmarks recorded in docs/benchmarks.md. Each scenario starts
# its own gateway (`runcast up`, embedded bus) as a child process on
# loopback, runs for a bounded time, and stops it.
#   bash scripts/bench.sh            # all scenarios
#   bash scripts/bench.sh fanout-1k  # one scenario
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000 2>/dev/null || true
cargo build --release -p runcast-cli
bin=target/release/runcast
out=target/bench
mkdir -p "$out"

run() {
  local name=$1; shift
  if [ -n "${only:-}" ] && [ "$only" != "$name" ]; then return; fi
  printf '\n== %s: runcast bench %s\n' "$name" "$*"
  timeout 300 "$bin" bench "$@" --out "$out/$name.json" 2>&1 | grep -v '^[{} ]\|^  "' || true
}

only=${1:-}
run fanout-1k   --clients 1000 --runs 1   --rate 200  --duration 10s
run fanout-5k   --clients 5000 --runs 500 --rate 1000 --duration 10s
run idle-10k    --scenario idle --clients 10000 --runs 100
run fanout-500  --clients 500  --runs 1   --rate 200  --duration 10s
echo
echo "JSON results in $out/"

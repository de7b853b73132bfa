#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed
# yet. Shared by scripts/test.sh and scripts/k8s-control-plane.sh.
#
# Service starts are denied during the install (a policy-rc.d that exits
# 101, unless the machine already has a policy): Debian's nginx would start
# a system server on port 80 and etcd-server a system etcd on 2379, while
# the tests run their own on other ports.
set -euo pipefail
missing=""
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=" $pkg"
done
[ -z "$missing" ] && exit 0
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
$sudo_cmd apt-get update -qq
policy=/usr/sbin/policy-rc.d
made=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$policy" >/dev/null
  $sudo_cmd chmod +x "$policy"
  made=1
fi
trap '[ -z "$made" ] || $sudo_cmd rm -f "$policy"' EXIT
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $missing >/dev/null

#!/usr/bin/env bash
# Renders the plain manifests in k8s/base from the Helm chart's defaults, so
# users without Helm get the same objects. A test checks they are current:
# run this after changing the chart.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/k8s-tools.sh)
{
  echo "# Rendered from charts/runcast by scripts/render-k8s.sh; do not edit."
  "$bin/helm" template runcast charts/runcast --namespace runcast --include-crds
} > k8s/base/runcast.yaml

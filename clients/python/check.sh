#!/usr/bin/env bash
# Builds the runcast Python package offline, installs the wheel into a fresh virtualenv, and runs
# the client's tests and the examples' tests against the INSTALLED package (not the source tree).
#
#   RUNCAST_BIN=/path/to/runcast bash clients/python/check.sh
#
# RUNCAST_BIN: the gateway binary the tests start (default /tmp/pybin/runcast, else `runcast` on
# PATH). PYTHON: the interpreter to build and test with (default python3).
#
# Building and installing the package never touches the network (--no-index, no build
# isolation: setuptools comes from the interpreter). Only if the examples' frameworks (fastapi,
# uvicorn, celery) or the optional extras' libraries (nats-py, websockets) are missing, they are
# installed into the throwaway venv from the package index; if that fails, the check fails.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ -z "${RUNCAST_BIN:-}" ]]; then
  if [[ -x /tmp/pybin/runcast ]]; then RUNCAST_BIN=/tmp/pybin/runcast
  else RUNCAST_BIN="$(command -v runcast || true)"; fi
fi
if [[ -z "$RUNCAST_BIN" || ! -x "$RUNCAST_BIN" ]]; then
  echo "check.sh: set RUNCAST_BIN to the runcast binary" >&2
  exit 2
fi
export RUNCAST_BIN
# The tests must import the wheel, never the source tree; and write nothing into the worktree.
unset PYTHONPATH
export PYTHONDONTWRITEBYTECODE=1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/runcast-py-check.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
t0=$SECONDS
step() { echo; echo "== $* ($((SECONDS - t0)) s)"; }

step "build the wheel offline"
# Build from a copy: an in-tree setuptools build leaves build/ and *.egg-info next to the source.
mkdir -p "$WORK/src-copy" "$WORK/dist"
cp -r "$HERE/pyproject.toml" "$HERE/README.md" "$HERE/src" "$WORK/src-copy/"
"$PYTHON" -m pip wheel --quiet --no-index --no-build-isolation --no-deps \
  --wheel-dir "$WORK/dist" "$WORK/src-copy"
WHEEL="$(ls "$WORK"/dist/runcast-*.whl)"
echo "built $(basename "$WHEEL")"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for need in ("runcast/__init__.py", "runcast/py.typed", "runcast/subscribe.py",
             "runcast/publisher.py", "runcast/_nats.py", "runcast/_ws.py"):
    assert need in names, f"{need} missing from the wheel"
meta = [n for n in names if n.endswith("METADATA")][0]
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
assert "Requires-Python: >=3.9" in text, "Requires-Python missing"
# Zero required dependencies: only extras may pull anything in.
reqs = [l for l in text.splitlines() if l.startswith("Requires-Dist:")]
assert all("extra ==" in l for l in reqs), reqs
print("wheel contents and metadata ok")
EOF

step "install it into a fresh venv offline"
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --no-index --no-deps "$WHEEL"
cd "$WORK"   # a directory with no src/ in it
"$VPY" - "$WORK/venv" <<'EOF'
import os, sys, runcast
path = os.path.realpath(runcast.__file__)
venv = os.path.realpath(sys.argv[1])
assert path.startswith(venv + os.sep), f"runcast imported from {path}, not from {venv}"
print(f"runcast {runcast.__version__} imported from {path}")
EOF

step "test dependencies"
need=()
"$VPY" -c "import pytest" 2>/dev/null || need+=("pytest")
"$VPY" -c "import nats" 2>/dev/null || need+=("nats-py")
"$VPY" -c "import websockets" 2>/dev/null || need+=("websockets")
"$VPY" -c "import fastapi, uvicorn" 2>/dev/null || need+=("fastapi" "uvicorn")
"$VPY" -c "import celery" 2>/dev/null || need+=("celery")
if ((${#need[@]})); then
  echo "installing into the venv: ${need[*]}"
  # A failed install fails the check: every test here must run, none may
  # be skipped for a missing library.
  "$VPY" -m pip install --quiet --disable-pip-version-check "${need[@]}"
else
  echo "all present"
fi

# Tests skip themselves where an optional library is missing (for users
# running them by hand); here everything is installed, so a skip is a failure.
no_skips() {
  if grep -qE '[0-9]+ skipped' "$WORK/pytest.out"; then
    echo "check.sh: tests were skipped; every one must run here" >&2
    exit 1
  fi
}

step "client tests against the installed wheel"
RUNCAST_PY_REQUIRE_INSTALLED=1 "$VPY" -m pytest -q -p no:cacheprovider --import-mode=importlib \
  -c "$HERE/pyproject.toml" --rootdir "$HERE" "$HERE/tests" 2>&1 | tee "$WORK/pytest.out"
no_skips

# One run per example, each rooted in its own directory: with examples/ as the root, the
# directory examples/celery would be importable as a package named `celery` and shadow Celery.
for ex in fastapi celery; do
  step "examples/$ex tests against the installed wheel"
  "$VPY" -m pytest -q -p no:cacheprovider --import-mode=importlib -c /dev/null \
    --rootdir "$REPO/examples/$ex" "$REPO/examples/$ex" 2>&1 | tee "$WORK/pytest.out"
  no_skips
done

step "done"

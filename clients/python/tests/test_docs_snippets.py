"""The Python snippets of the README, docs/clients.md and this package's README, run as written
against a real gateway, with the package as installed: the blocks after a
`<!-- test: python-client -->` line. `127.0.0.1:8080` in a block means the test's gateway.

Blocks run in file order, so a block that follows a run (`since=0, until_finished=True`) finds
the completion an earlier block published."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import List, Tuple

import pytest

import support

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FILES = ["README.md", "docs/clients.md", "clients/python/README.md"]
MARKER = "<!-- test: python-client -->"


def blocks() -> List[Tuple[str, str]]:
    out = []
    for rel in FILES:
        lines = open(os.path.join(REPO, rel), encoding="utf-8").read().split("\n")
        for i, line in enumerate(lines):
            if line.strip() != MARKER:
                continue
            assert lines[i + 1] == "```python", f"{rel}:{i + 2}: a python block follows the marker"
            end = lines.index("```", i + 2)
            out.append((f"{rel}:{i + 2}", "\n".join(lines[i + 2:end])))
    return out


def test_every_file_has_a_snippet() -> None:
    where = [w.split(":")[0] for w, _ in blocks()]
    assert set(where) == set(FILES), where


@pytest.fixture(scope="module")
def gateway(procs: support.Procs, workdir: str) -> support.Gateway:
    return support.start_embedded(procs, workdir, name="docs")


@pytest.mark.parametrize("where,body", blocks(), ids=[w for w, _ in blocks()])
def test_snippet_runs_as_written(where: str, body: str, gateway: support.Gateway) -> None:
    code = body.replace("http://127.0.0.1:8080", gateway.url)
    # The package this suite tests (the installed wheel under check.sh), wherever it is.
    import runcast
    env = support.clean_env({"PYTHONPATH": os.path.dirname(os.path.dirname(runcast.__file__))})
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(__file__), env=env)
    assert p.returncode == 0, f"{where}:\n{p.stdout}\n{p.stderr}"
    if "subscribe(" in code:
        # It followed the run to its end: the completion the publishing snippet sent.
        assert re.search(r"complete", p.stdout), f"{where}:\n{p.stdout}"

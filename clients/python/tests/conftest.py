"""Fixtures: real runcast gateways on loopback ports.

- `embedded`: `runcast up` (embedded bus; the demo is off unless --demo is given);
- `nats_pair`: a `nats-server -js` and two `runcast gateway --nats ... --allow-anonymous
  --allow-anonymous-publish`; tests publish on A and subscribe on B;
- `secure`: `runcast up` with an HS256 secret (subscriber tokens) and a publish key;
- `dep`: parametrized over embedded and nats.

Every process is stopped by PID at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import support  # noqa: E402
from support import FIGURES, SECRET, Procs, start_embedded, start_nats_gateway  # noqa: E402


def pytest_report_header(config: pytest.Config) -> List[str]:
    import runcast
    b = support.runcast_bin()
    try:
        v = subprocess.run([b, "--version"], capture_output=True, text=True, timeout=10).stdout
    except Exception as e:  # noqa: BLE001
        v = repr(e)
    return [f"runcast binary: {b} ({v.strip()})", f"runcast package: {runcast.__file__}",
            f"nats-server: {support.nats_server_bin()}"]


def pytest_sessionstart(session: pytest.Session) -> None:
    # check.sh sets this so that the suite provably runs against the installed wheel, not the
    # source tree next to it.
    if os.environ.get("RUNCAST_PY_REQUIRE_INSTALLED"):
        import runcast
        src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
        path = os.path.realpath(runcast.__file__)
        if path.startswith(os.path.realpath(src)) or "site-packages" not in path:
            raise pytest.UsageError(f"runcast imported from {path}, not from an installed wheel")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("runcast client figures")
        for k, v in FIGURES.items():
            terminalreporter.write_line(f"{k}: {v}")


@pytest.fixture(scope="session")
def procs() -> Iterator[Procs]:
    s = Procs()
    yield s
    s.stop_all()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("runcast"))


@pytest.fixture(scope="session")
def embedded(procs: Procs, workdir: str) -> support.Gateway:
    return start_embedded(procs, workdir)


@pytest.fixture(scope="session")
def nats_server(procs: Procs, workdir: str) -> support.NatsServer:
    return procs.add(support.NatsServer(workdir))


@pytest.fixture(scope="session")
def nats_pair(procs: Procs, workdir: str, nats_server: support.NatsServer) -> List[support.Gateway]:
    return [start_nats_gateway(procs, workdir, nats_server.url, name=n) for n in ("gwA", "gwB")]


@dataclass
class Dep:
    kind: str
    pub: str   # where tests publish
    sub: str   # where tests subscribe (the other gateway on NATS)
    nats_url: Optional[str] = None


@pytest.fixture(params=["embedded", "nats"])
def dep(request: pytest.FixtureRequest) -> Dep:
    if request.param == "embedded":
        g = request.getfixturevalue("embedded")
        return Dep("embedded", g.url, g.url)
    a, b = request.getfixturevalue("nats_pair")
    return Dep("nats", a.url, b.url, request.getfixturevalue("nats_server").url)


@dataclass
class Secure:
    gw: support.Gateway
    key: str


@pytest.fixture(scope="session")
def secure(procs: Procs, workdir: str) -> Secure:
    out = subprocess.run([support.runcast_bin(), "publish-key", "ci", "ok-"], capture_output=True,
                         text=True, timeout=20, env=support.clean_env())
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(":", 1) for line in (out.stdout + out.stderr).splitlines()
                  if line.startswith(("key:", "entry:")))
    key, entry = fields["key"].strip(), fields["entry"].strip()
    gw = start_embedded(procs, workdir, "--auth-hs256-secret", SECRET, "--publish-key", entry,
                        name="secure")
    return Secure(gw, key)

"""Fixtures for the FastAPI example's test: `runcast up` and the app under uvicorn, both on free
loopback ports, both stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Iterator, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def runcast_bin() -> str:
    b = os.environ.get("RUNCAST_BIN") or "/tmp/pybin/runcast"
    if not os.path.exists(b):
        b = shutil.which("runcast") or b
    return b


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            with open(log_path, "rb") as f:
                tail = f.read()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"{proc.args} exited:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready in {timeout}s")
        time.sleep(0.05)


def start(argv: List[str], log_path: str, env: Dict[str, str], ready_url: str,
          procs: List[subprocess.Popen]) -> subprocess.Popen:
    log = open(log_path, "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                         stdin=subprocess.DEVNULL)
    procs.append(p)
    wait_http(ready_url, p, log_path)
    return p


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, str]]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    tmp = str(tmp_path_factory.mktemp("fastapi-example"))
    procs: List[subprocess.Popen] = []
    try:
        rport, aport = free_port(), free_port()
        runcast_url = f"http://127.0.0.1:{rport}"
        gw_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCAST_")}
        start([runcast_bin(), "up", "--listen", f"127.0.0.1:{rport}"],
              os.path.join(tmp, "runcast.log"), gw_env, runcast_url + "/readyz", procs)
        app_env = dict(os.environ, RUNCAST_URL=runcast_url, CODEGEN_STEP_DELAY="0.005")
        app_url = f"http://127.0.0.1:{aport}"
        start([sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port",
               str(aport), "--log-level", "warning"], os.path.join(tmp, "app.log"), app_env,
              app_url + "/healthz", procs)
        yield {"runcast": runcast_url, "app": app_url}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(6)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)

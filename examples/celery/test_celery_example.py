"""The Celery example against a real `runcast up`: a real Celery worker (in-process, in-memory
broker) runs the task sent with .delay(), while runcast.subscribe follows the run; then the same
task id runs again and nothing is stored twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Dict, Iterator, List

import pytest

celery = pytest.importorskip("celery")

import runcast  # noqa: E402


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def runcast_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    b = os.environ.get("RUNCAST_BIN") or "/tmp/pybin/runcast"
    if not os.path.exists(b):
        b = shutil.which("runcast") or b
    port = _free_port()
    log = open(tmp_path_factory.mktemp("celery-example") / "runcast.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCAST_")}
    p = subprocess.Popen([b, "up", "--listen", f"127.0.0.1:{port}"], stdout=log,
                         stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert p.poll() is None, "runcast up exited"
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "runcast up not ready"
                time.sleep(0.05)
        yield url
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(6)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        log.close()


@pytest.fixture(scope="module")
def tasks(runcast_url: str) -> Any:
    # The example module sits next to this file; pytest's importlib mode does not put this
    # directory on sys.path by itself.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import tasks as mod
    mod.RUNCAST_URL = runcast_url  # what a worker would read from RUNCAST_URL
    # The in-memory broker polls once a second by default; poll faster to keep the test short.
    mod.app.conf.broker_transport_options = {"polling_interval": 0.05}
    return mod


def history(url: str, run: str) -> List[Dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/v1/runs/{run}/events?since=0&limit=1000", timeout=5) as r:
        return json.loads(r.read())["events"]


def test_worker_task_publishes_progress(runcast_url, tasks):
    from celery.contrib.testing.worker import start_worker

    run = "report-" + os.urandom(6).hex()
    got: List[runcast.Item] = []
    ready = threading.Event()

    async def follow() -> None:
        sub = runcast.subscribe(runcast_url, run, until_finished=True)
        async for item in sub:
            got.append(item)
            if isinstance(item, runcast.State):
                ready.set()

    follower = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(follow(), 30)))
    follower.start()
    assert ready.wait(10), "subscription did not start"
    # A real worker (thread pool, in this process) consuming from the in-memory broker.
    with start_worker(tasks.app, pool="threads", concurrency=1, perform_ping_check=False,
                      shutdown_timeout=10):
        result = tasks.build_report.delay(run, sections=4)
        value = result.get(timeout=20)
    follower.join(30)
    assert not follower.is_alive()

    assert value == {"sections": 4, "task": result.id}
    assert isinstance(got[0], runcast.State) and got[0].seq == 0  # subscribed before the task
    events = [i for i in got[1:] if isinstance(i, runcast.Event)]
    assert [e.kind for e in events] == ["status"] + ["log", "progress"] * 4 + ["complete"]
    assert [e.data["done"] for e in events if e.kind == "progress"] == [1, 2, 3, 4]
    assert events[-1].data == value
    assert [e.seq for e in events] == [e["seq"] for e in history(runcast_url, run)]


def test_rerunning_a_task_stores_nothing_twice(runcast_url, tasks):
    run = "report-" + os.urandom(6).hex()
    # First run fails half-way (as a crashed worker would leave it) ...
    with pytest.raises(RuntimeError):
        tasks.build_report.apply(args=(run, 3), kwargs={"fail_at": 2}, task_id="t-1",
                                 throw=True)
    first = history(runcast_url, run)
    assert [e["kind"] for e in first] == ["status", "log", "progress", "log", "progress", "error"]
    # ... Celery runs the same task id again: the events it already published keep their seqs,
    # only the new ones are stored.
    r = tasks.build_report.apply(args=(run, 3), task_id="t-1", throw=True)
    assert r.get() == {"sections": 3, "task": "t-1"}
    again = history(runcast_url, run)
    assert again[:len(first)] == first
    assert [e["kind"] for e in again[len(first):]] == ["log", "progress", "complete"]

"""End to end: POST a job to the FastAPI app (under uvicorn), follow the run it returns with
runcast.subscribe, and check every event of the job, in order, and the final state."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any, Dict, List

import runcast


def post_json(url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202, r.status
        return json.loads(r.read())


def follow(runcast_url: str, run: str) -> List[runcast.Item]:
    async def main() -> List[runcast.Item]:
        # since=0: the job may have published before we subscribed; replay it all.
        return [i async for i in runcast.subscribe(runcast_url, run, since=0,
                                                   until_finished=True)]

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_job_streams_status_logs_and_completion(servers):
    answer = post_json(servers["app"] + "/generate", {"prompt": "A todo app", "files": 3})
    run = answer["run"]
    assert answer["stream"] == f"{servers['runcast']}/v1/runs/{run}/stream"
    assert answer["watch"] == f"{servers['runcast']}/#run={run}"

    items = follow(servers["runcast"], run)
    assert isinstance(items[0], runcast.State)
    events = [i for i in items[1:] if isinstance(i, runcast.Event)]
    assert len(events) == len(items) - 1, "a gap in a fresh run"
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)) == list(range(1, len(seqs) + 1))  # embedded bus: 1, 2, 3, ...

    kinds = [e.kind for e in events]
    assert kinds[0] == "status" and events[0].data == {"state": "planning", "prompt": "A todo app"}
    assert kinds[-1] == "complete"
    files = events[-1].data["files"]
    assert files == ["a_todo_app/module_1.py", "a_todo_app/module_2.py", "a_todo_app/module_3.py"]
    logs = [e.data for e in events if e.kind == "log"]
    assert len(logs) == events[-1].data["lines"] == 12
    assert [line["file"] for line in logs] == [f for f in files for _ in range(4)]
    assert [e.data["done"] for e in events if e.kind == "progress"] == [0, 1, 2, 3]
    assert [e.data["state"] for e in events if e.kind == "status"] == \
        ["planning", "writing", "writing", "writing", "testing"]

    with urllib.request.urlopen(answer["state"], timeout=5) as r:
        state = json.loads(r.read())
    assert state["status"] == "completed" and state["percent"] == 100
    assert state["seq"] == seqs[-1] and state["result"] == events[-1].data


def test_failed_job_reports_the_error(servers):
    run = post_json(servers["app"] + "/generate", {"prompt": "please fail", "files": 2})["run"]
    items = follow(servers["runcast"], run)
    events = [i for i in items if isinstance(i, runcast.Event)]
    assert [e.kind for e in events] == ["status", "progress", "error"]
    assert events[-1].data == {"message": "the model refused the prompt", "type": "RuntimeError"}


def test_many_jobs_at_once_each_stream_complete(servers):
    runs = [post_json(servers["app"] + "/generate", {"prompt": f"job {i}", "files": 2})["run"]
            for i in range(5)]

    async def main() -> List[List[runcast.Item]]:
        async def one(run: str) -> List[runcast.Item]:
            return [i async for i in runcast.subscribe(servers["runcast"], run, since=0,
                                                       until_finished=True)]
        return await asyncio.gather(*(one(r) for r in runs))

    results = asyncio.run(asyncio.wait_for(main(), 30))
    for run, items in zip(runs, results):
        events = [i for i in items if isinstance(i, runcast.Event)]
        assert all(e.run == run for e in events)
        assert events[-1].kind == "complete" and events[-1].data["lines"] == 8

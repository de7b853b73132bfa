"""A FastAPI service whose code-generation jobs stream their progress through runcast.

The usual way to show a long job's progress is to keep a WebSocket open in the request handler
and push updates from there: the handler lives as long as the job, the job dies with the
connection, and a user who reloads the page loses everything sent so far. Here the handler only
starts the job and answers at once with the run ID and where to watch it. The job publishes its
status, log lines and result to runcast; any number of watchers (the page at `/`, `runcast tail`,
`runcast.subscribe`) follow it, join late, reconnect, and get every event exactly once.

    RUNCAST_URL=http://127.0.0.1:8080 uvicorn app:app --port 8000
    curl -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "a todo app", "files": 3}'

Settings (environment): RUNCAST_URL, the gateway the service publishes to;
RUNCAST_PUBLIC_URL, the one browsers use (default: RUNCAST_URL); RUNCAST_PUBLISH_KEY, a key
from `runcast publish-key` when the gateway requires one; CODEGEN_STEP_DELAY, seconds per
generated line (to make the demo watchable).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Dict, List

from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel, Field

import runcast

RUNCAST_URL = os.environ.get("RUNCAST_URL", "http://127.0.0.1:8080")
RUNCAST_PUBLIC_URL = os.environ.get("RUNCAST_PUBLIC_URL", RUNCAST_URL).rstrip("/")
RUNCAST_PUBLISH_KEY = os.environ.get("RUNCAST_PUBLISH_KEY") or None
STEP_DELAY = float(os.environ.get("CODEGEN_STEP_DELAY", "0.02"))

log = logging.getLogger("codegen")
app = FastAPI(title="codegen with runcast progress")


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)
    files: int = Field(default=3, ge=1, le=20)


class GenerateResponse(BaseModel):
    run: str
    watch: str    # the watch page, opened on this run
    stream: str   # Server-Sent Events for this run (what runcast.subscribe reads)
    state: str    # the run's current state, JSON


@app.get("/healthz")
async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


@app.post("/generate", status_code=202, response_model=GenerateResponse)
async def generate(req: GenerateRequest, background: BackgroundTasks) -> GenerateResponse:
    # The run ID is ours to choose: 1-128 characters of [A-Za-z0-9_-].
    run = f"codegen-{uuid.uuid4().hex[:16]}"
    # Runs after the response is sent; the request does not wait for the job.
    background.add_task(generate_code, run, req.prompt, req.files)
    return GenerateResponse(
        run=run,
        watch=f"{RUNCAST_PUBLIC_URL}/#run={run}",
        stream=f"{RUNCAST_PUBLIC_URL}/v1/runs/{run}/stream",
        state=f"{RUNCAST_PUBLIC_URL}/v1/runs/{run}",
    )


def plan_files(prompt: str, files: int) -> List[str]:
    stem = "".join(c if c.isalnum() else "_" for c in prompt.lower())[:24].strip("_") or "app"
    return [f"{stem}/module_{i + 1}.py" for i in range(files)]


def fake_code(path: str) -> List[str]:
    """Stands in for a model generating code, line by line."""
    name = path.rsplit("/", 1)[-1][:-3]
    return [f"# {path}", f"def {name}() -> str:", f"    return {name!r}", ""]


async def generate_code(run: str, prompt: str, files: int) -> None:
    """The job. Every step is an event: status changes, each generated line, progress, and the
    result (or the error) at the end."""
    async with runcast.AsyncPublisher(RUNCAST_URL, run, key=RUNCAST_PUBLISH_KEY) as pub:
        try:
            await pub.status("planning", prompt=prompt)
            paths = plan_files(prompt, files)
            await pub.progress(0, len(paths))
            if "fail" in prompt.lower():
                raise RuntimeError("the model refused the prompt")
            lines = 0
            for i, path in enumerate(paths):
                await pub.status("writing", file=path)
                for line in fake_code(path):
                    await asyncio.sleep(STEP_DELAY)
                    await pub.log(line, file=path)
                    lines += 1
                await pub.progress(i + 1, len(paths), file=path)
            await pub.status("testing")
            await pub.complete({"files": paths, "lines": lines})
        except runcast.RuncastError:
            # runcast itself is unreachable or refused us (the retries are spent): nothing more
            # can be reported through it, so only the service log hears about it.
            log.exception("run %s: could not publish progress", run)
        except Exception as e:  # noqa: BLE001 - any job failure is reported to the watchers
            log.exception("run %s failed", run)
            try:
                await pub.error(str(e), type=type(e).__name__)
            except runcast.RuncastError:
                log.exception("run %s: could not publish the failure", run)

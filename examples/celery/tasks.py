"""A Celery worker task that reports its progress through runcast.

The task publishes with the blocking `runcast.Publisher` (Celery tasks are synchronous). Its
events carry ids derived from the Celery task id, so when Celery runs the same task again (a
retry, or a redelivery after a worker died with `acks_late`), the events already published are
not stored twice: the gateway answers with the first copy's seq (docs/protocol.md, Safe
retries; the duplicate window is 2 minutes).

    RUNCAST_URL=http://127.0.0.1:8080 celery -A tasks worker --loglevel=info
    >>> from tasks import build_report
    >>> build_report.delay("report-2026-11", sections=5)

Settings (environment): RUNCAST_URL, RUNCAST_PUBLISH_KEY, CELERY_BROKER_URL and
CELERY_RESULT_BACKEND (defaults: in-memory, enough for one process and for the tests),
REPORT_STEP_DELAY (seconds per section).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from celery import Celery

import runcast

RUNCAST_URL = os.environ.get("RUNCAST_URL", "http://127.0.0.1:8080")
RUNCAST_PUBLISH_KEY = os.environ.get("RUNCAST_PUBLISH_KEY") or None
STEP_DELAY = float(os.environ.get("REPORT_STEP_DELAY", "0.01"))

app = Celery("reports",
             broker=os.environ.get("CELERY_BROKER_URL", "memory://"),
             backend=os.environ.get("CELERY_RESULT_BACKEND", "cache+memory://"))


def render_section(i: int) -> str:
    """Stands in for real work."""
    time.sleep(STEP_DELAY)
    return f"section {i + 1}: {sum(range(1000 * (i + 1)))}"


@app.task(bind=True, name="reports.build_report")
def build_report(self: Any, run: str, sections: int = 5, fail_at: int = -1) -> Dict[str, Any]:
    task_id = self.request.id or "local"

    def eid(step: str) -> str:
        # Stable across re-runs of this task, unique within the run.
        return f"{task_id}/{step}"

    with runcast.Publisher(RUNCAST_URL, run, key=RUNCAST_PUBLISH_KEY) as pub:
        pub.publish("status", {"state": "started", "task": task_id}, id=eid("start"))
        try:
            for i in range(sections):
                if i == fail_at:
                    raise RuntimeError(f"section {i + 1} could not be rendered")
                line = render_section(i)
                pub.publish("log", {"line": line}, id=eid(f"log-{i}"))
                pub.publish("progress", {"done": i + 1, "total": sections}, id=eid(f"p-{i}"))
        except Exception as e:
            pub.publish("error", {"message": str(e), "task": task_id}, id=eid("error"))
            raise
        result = {"sections": sections, "task": task_id}
        pub.publish("complete", result, id=eid("complete"))
    return result

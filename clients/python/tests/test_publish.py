"""Publisher and AsyncPublisher against real gateways: every helper kind, state and history read
back over HTTP (with urllib, not with the client under test), batches, ids, traceparent."""

from __future__ import annotations

import json

import pytest
from support import bounded, get_json, history, uid, wait_until

import runcast

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _check_all_kinds(base: str, run: str, seqs: list) -> None:
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    evs = history(base, run)
    assert [e["seq"] for e in evs] == seqs
    assert [(e["kind"], e["data"]) for e in evs] == [
        ("status", {"state": "compiling", "step": 1}),
        ("progress", {"done": 3, "total": 10}),
        ("log", {"line": "cc -O2 main.c"}),
        ("deploy", {"target": "eu", "ok": True, "nested": {"list": [1, 2.5, None, "é"]}}),
        ("complete", {"artifacts": 2}),
    ]
    # On NATS a gateway's state may be up to 1 s behind the stream (docs/protocol.md, Run state).
    st = wait_until(lambda: _state_at(base, run, seqs[-1]), 5)
    assert st["status"] == "completed", st
    assert st["progress"] == {"done": 3, "total": 10}
    assert st["last_status"] == {"state": "compiling", "step": 1}
    assert st["result"] == {"artifacts": 2}
    assert st["percent"] == 100


def _state_at(base: str, run: str, seq: int):
    st = get_json(f"{base}/v1/runs/{run}")
    return st if st["seq"] >= seq else None


def test_sync_publisher_every_kind(dep):
    run = uid("sync")
    with runcast.Publisher(dep.pub, run) as p:
        seqs = [p.status("compiling", step=1), p.progress(3, 10), p.log("cc -O2 main.c"),
                p.publish("deploy", {"target": "eu", "ok": True,
                                     "nested": {"list": [1, 2.5, None, "é"]}}),
                p.complete({"artifacts": 2})]
    _check_all_kinds(dep.sub, run, seqs)


def test_async_publisher_every_kind(dep):
    run = uid("async")

    async def main() -> list:
        async with runcast.AsyncPublisher(dep.pub, run) as p:
            return [await p.status("compiling", step=1), await p.progress(3, 10),
                    await p.log("cc -O2 main.c"),
                    await p.publish("deploy", {"target": "eu", "ok": True,
                                               "nested": {"list": [1, 2.5, None, "é"]}}),
                    await p.complete({"artifacts": 2})]

    seqs = bounded(main())
    _check_all_kinds(dep.sub, run, seqs)


def test_error_marks_the_run_failed(embedded):
    run = uid("fail")
    with runcast.Publisher(embedded.url, run) as p:
        p.progress(1, 4)
        seq = p.error("disk full", node="n3")
    st = get_json(f"{embedded.url}/v1/runs/{run}")
    assert st["status"] == "failed" and st["seq"] == seq
    assert st["result"] == {"message": "disk full", "node": "n3"}


def test_complete_without_result_and_progress_without_total(embedded):
    run = uid("bare")
    with runcast.Publisher(embedded.url, run) as p:
        p.progress(30)
        p.progress(0.5, 1, eta_s=12)
        p.complete()
    evs = history(embedded.url, run)
    assert [e["data"] for e in evs] == [{"done": 30}, {"done": 0.5, "total": 1, "eta_s": 12}, {}]


def test_batch_and_own_ids_are_idempotent(embedded):
    run = uid("batch")
    p = runcast.Publisher(embedded.url, run)
    seqs = p.publish_many([runcast.NewEvent("log", {"line": "a"}, id="step-1"),
                           {"kind": "log", "data": {"line": "b"}, "id": "step-2"}])
    assert len(seqs) == 2
    # Same ids again, from a new publisher (as after a worker restart): stored once, same seqs.
    again = runcast.Publisher(embedded.url, run).publish_many(
        [runcast.NewEvent("log", {"line": "a"}, id="step-1"),
         runcast.NewEvent("log", {"line": "b"}, id="step-2")])
    assert again == seqs
    # An explicit idempotency key reused by hand (what a caller does after a TransportError).
    k = "manual-retry-key-1"
    s1 = p.publish("log", {"line": "c"}, idempotency_key=k)
    s2 = p.publish("log", {"line": "c"}, idempotency_key=k)
    assert s1 == s2
    assert [e["data"]["line"] for e in history(embedded.url, run)] == ["a", "b", "c"]
    p.close()


def test_traceparent_reaches_subscribers(embedded):
    run = uid("trace")
    with runcast.Publisher(embedded.url, run) as p:
        p.publish("log", {"line": "x"}, traceparent=TRACEPARENT)

    async def main() -> runcast.Event:
        async with runcast.subscribe(embedded.url, run, since=0) as sub:
            async for item in sub:
                if isinstance(item, runcast.Event):
                    return item
        raise AssertionError("no event")

    ev = bounded(main(), 10)
    assert ev.traceparent is not None and ev.traceparent.split("-")[1] == TRACEPARENT.split("-")[1]


def test_client_side_checks_send_nothing(embedded):
    with pytest.raises(runcast.InvalidRequestError) as e:
        runcast.Publisher(embedded.url, "a.b")
    assert e.value.code == "invalid_run_id" and isinstance(e.value, ValueError)
    p = runcast.Publisher(embedded.url, uid("chk"))
    with pytest.raises(runcast.InvalidRequestError) as e:
        p.publish("Bad Kind", {})
    assert e.value.code == "invalid_kind"
    with pytest.raises(runcast.InvalidRequestError) as e:
        p.publish("log", {"x": float("nan")})
    assert e.value.code == "invalid_event"
    with pytest.raises(runcast.InvalidRequestError):
        p.publish("log", {}, id="has space")


def test_unicode_and_key_order_survive(embedded):
    run = uid("uni")
    data = {"z": 1, "a": "日本語 ✓ \u2028", "m": [{"b": 2, "a": 1}]}
    with runcast.Publisher(embedded.url, run) as p:
        p.publish("custom-kind_1", data)
    ev = history(embedded.url, run)[0]
    assert json.dumps(ev["data"]) == json.dumps(data)

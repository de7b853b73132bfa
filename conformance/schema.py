"""Field checks for every documented frame and HTTP body (docs/protocol.md, proto/runcast/v1).

Extra fields are tolerated (a proto3 JSON reader ignores them); documented fields must be present
with the documented JSON types.
"""

from __future__ import annotations

import re

RUN_STATUSES = {"running", "completed", "failed"}
ERROR_CODES = {
    "invalid_json", "invalid_frame", "unknown_type", "invalid_run_id", "invalid_since",
    "since_out_of_range", "binary_not_supported", "too_large", "too_many_subscriptions",
    "already_subscribed", "not_subscribed", "invalid_kind", "invalid_event", "too_many_events",
    "capacity", "run_not_found", "not_found", "method_not_allowed", "unavailable", "draining",
    "unauthorized", "forbidden", "rate_limited", "conflict", "request_timeout", "internal",
    "data_too_deep", "invalid_query",
}
KIND_RE = re.compile(r"^(progress|log|status|complete|error|[a-z0-9_-]{1,64})$")


def is_uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_hello(f):
    assert f.get("type") == "hello", f
    assert f.get("version") == 1, f"hello.version should be 1: {f}"
    for k in ("connection", "heartbeat_ms", "max_frame_bytes", "max_subscriptions"):
        assert is_uint(f.get(k)), f"hello.{k} missing or not an unsigned integer: {f}"
    assert isinstance(f.get("anonymous"), bool), f"hello.anonymous missing or not a bool: {f}"


def check_run_state(s, run=None):
    assert isinstance(s, dict), f"RunState is not an object: {s!r}"
    assert isinstance(s.get("run"), str), f"RunState.run: {s}"
    if run is not None:
        assert s["run"] == run, f"RunState.run {s['run']!r} != {run!r}"
    assert is_uint(s.get("seq")), f"RunState.seq: {s}"
    assert s.get("status") in RUN_STATUSES, f"RunState.status: {s}"
    assert is_uint(s.get("events")), f"RunState.events: {s}"
    for k in ("started_ts", "updated_ts"):
        assert is_uint(s.get(k)), f"RunState.{k}: {s}"
    if s.get("finished_ts") is not None:
        assert is_uint(s["finished_ts"]), f"RunState.finished_ts: {s}"
    if s.get("percent") is not None:
        assert is_num(s["percent"]), f"RunState.percent: {s}"


def check_state_frame(f, run=None):
    assert f.get("type") == "state", f
    assert isinstance(f.get("run"), str), f
    if run is not None:
        assert f["run"] == run, f
    assert is_uint(f.get("seq")), f"state.seq: {f}"
    assert "state" in f, f"state frame without a state field: {f}"
    if f["state"] is None:
        assert f["seq"] == 0, f"null state must come with seq 0: {f}"
    else:
        check_run_state(f["state"], f["run"])
        assert f["state"]["seq"] == f["seq"], f"state.seq != frame seq: {f}"


def check_event(f, run=None):
    assert f.get("type") == "event", f
    assert isinstance(f.get("run"), str), f
    if run is not None:
        assert f["run"] == run, f
    assert is_uint(f.get("seq")) and f["seq"] >= 1, f"event.seq: {f}"
    assert isinstance(f.get("kind"), str) and KIND_RE.match(f["kind"]), f"event.kind: {f}"
    assert "data" in f, f"event without data: {f}"
    assert is_uint(f.get("ts")), f"event.ts: {f}"
    if "traceparent" in f:
        assert isinstance(f["traceparent"], str), f


def check_gap(f, run=None):
    assert f.get("type") == "gap", f
    if run is not None:
        assert f.get("run") == run, f
    assert is_uint(f.get("from")) and is_uint(f.get("to")), f
    assert f["from"] <= f["to"], f"gap from > to: {f}"
    assert isinstance(f.get("message"), str), f


def check_error_frame(f):
    assert f.get("type") == "error", f
    assert f.get("code") in ERROR_CODES, f"undocumented error code: {f}"
    assert isinstance(f.get("message"), str) and f["message"], f


def check_history(doc, run):
    assert isinstance(doc, dict), doc
    assert doc.get("run") == run, doc
    assert isinstance(doc.get("events"), list), doc
    for k in ("first", "head", "next_since"):
        assert is_uint(doc.get(k)), f"history.{k}: {doc}"
    assert "gap" in doc, f"history page without gap field: {doc}"
    if doc["gap"] is not None:
        assert is_uint(doc["gap"].get("from")) and is_uint(doc["gap"].get("to")), doc
    for e in doc["events"]:
        check_event(e, run)

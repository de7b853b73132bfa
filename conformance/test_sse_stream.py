"""docs/protocol.md "SSE fallback: GET /v1/runs/<run>/stream", read through a WHATWG-conformant parser."""

import json
import time

import pytest

import schema
from harness import (assert_error, collect_events, log, open_sse, progress, publish_ok,
                     sse_collect, subscribe, uid, ws)


def test_sse_headers(dep):
    run = uid()
    publish_ok(dep.a, run, log("x"))
    st = open_sse(dep.b, run)
    try:
        assert st.status == 200, st.resp
        ct = st.header("content-type") or ""
        assert ct.split(";")[0].strip() == "text/event-stream", ct
        assert (st.header("cache-control") or "").lower() == "no-cache", st.resp.headers
        assert (st.header("x-accel-buffering") or "").lower() == "no", st.resp.headers
    finally:
        st.close()


def test_sse_retry_then_state_with_id_then_events_with_ids(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(1, 4), progress(2, 4)])
    st = open_sse(dep.b, run)
    try:
        ev = st.next_event(5)
        assert st.parser.retry is not None, f"no valid retry field before the first message: {st.raw[:200]!r}"
        assert st.parser.retry > 0
        assert ev.type == "message", "frames are default 'message' events (the docs use onmessage)"
        f = json.loads(ev.data)
        schema.check_state_frame(f, run)
        assert f["seq"] == seqs[-1]
        assert ev.last_event_id == str(f["seq"]), "the state frame carries id: <seq>"
        live = publish_ok(dep.a, run, [progress(3, 4), log("l")])
        for s in live:
            ev = st.next_event(5)
            f = json.loads(ev.data)
            schema.check_event(f, run)
            assert ev.type == "message"
            assert f["seq"] == s
            assert ev.last_event_id == str(s), "event frames carry id: <seq>"
    finally:
        st.close()


def test_sse_frames_equal_websocket_frames(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(1, 3), {"kind": "status", "data": {"a": [1, 2]}}])
    c = ws(dep.b)
    subscribe(c, run, since=0)
    ws_frames = collect_events(c, run, seqs[-1])
    c.close()
    st = open_sse(dep.b, run, "since=0")
    try:
        st.next_event(5)  # state
        sse_frames = sse_collect(st, run, seqs[-1])
    finally:
        st.close()
    assert sse_frames == ws_frames


def test_sse_state_frame_for_empty_run_is_seq_0(dep):
    run = uid()
    st = open_sse(dep.b, run)
    try:
        ev = st.next_event(5)
        f = json.loads(ev.data)
        schema.check_state_frame(f, run)
        assert f["seq"] == 0 and f["state"] is None, f
        assert ev.last_event_id == "0", f"state frame id should be its seq 0, got {ev.last_event_id!r}"
        seqs = publish_ok(dep.a, run, log("now"))
        assert [e["seq"] for e in sse_collect(st, run, seqs[-1])] == seqs
    finally:
        st.close()


@pytest.mark.parametrize("how", ["last-event-id", "since"])
def test_sse_resume(dep, how):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(i, 6) for i in range(1, 7)])
    cursor = seqs[2]
    if how == "since":
        st = open_sse(dep.b, run, f"since={cursor}")
    else:
        st = open_sse(dep.b, run, headers={"Last-Event-ID": str(cursor)})
    try:
        assert st.status == 200, st.resp
        ev = st.next_event(5)
        first = json.loads(ev.data)
        assert first["type"] == "state", first
        # "the state frame [carries] the cursor the stream starts from: ... the resume point"
        assert ev.last_event_id == str(cursor), (ev.last_event_id, cursor, first["seq"])
        assert [e["seq"] for e in sse_collect(st, run, seqs[-1])] == seqs[3:]
        live = publish_ok(dep.a, run, log("live"))
        assert [e["seq"] for e in sse_collect(st, run, live[-1])] == live
    finally:
        st.close()


def test_sse_since_zero_replays_all(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [log(str(i)) for i in range(5)])
    st = open_sse(dep.b, run, "since=0")
    try:
        st.next_event(5)
        assert [e["seq"] for e in sse_collect(st, run, seqs[-1])] == seqs
    finally:
        st.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", " 1x", "0x1"])
def test_sse_bad_last_event_id_is_400_invalid_since(dep, value):
    run = uid()
    publish_ok(dep.a, run, log("x"))
    st = open_sse(dep.b, run, headers={"Last-Event-ID": value})
    assert_error(st.resp, 400, "invalid_since")


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "%2B1"])
def test_sse_bad_since_query_is_400_invalid_since(dep, value):
    run = uid()
    publish_ok(dep.a, run, log("x"))
    st = open_sse(dep.b, run, f"since={value}")
    assert_error(st.resp, 400, "invalid_since")


@pytest.mark.parametrize("how", ["since", "last-event-id"])
def test_sse_cursor_past_last_seq_is_400_since_out_of_range(dep, how):
    run = uid()
    seqs = publish_ok(dep.a, run, log("x"))
    if how == "since":
        st = open_sse(dep.b, run, f"since={seqs[-1] + 10}")
    else:
        st = open_sse(dep.b, run, headers={"Last-Event-ID": str(seqs[-1] + 10)})
    try:
        assert_error(st.resp, 400, "since_out_of_range")
    finally:
        st.close()


def test_sse_bad_run_id_is_400(dep):
    st = open_sse(dep.b, "a.b")
    assert_error(st.resp, 400, "invalid_run_id")


def test_sse_heartbeat_comments(limits_dep):
    """`: heartbeat` comments every heartbeat interval (1 s on this gateway)."""
    run = uid()
    st = open_sse(limits_dep.a, run)
    try:
        st.next_event(5)
        t0 = time.monotonic()
        deadline = t0 + 4.5
        while time.monotonic() < deadline and len(st.comments) < 2:
            try:
                st.next_item(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
        assert len(st.comments) >= 2, f"expected heartbeat comments every 1 s; got {st.comments}"
        assert all(c[1].strip() == "heartbeat" for c in st.comments), st.comments
    finally:
        st.close()


def test_sse_survives_silence_longer_than_heartbeat_timeout(limits_dep):
    """SSE clients cannot send anything; they must not be closed for heartbeat silence."""
    run = uid()
    st = open_sse(limits_dep.a, run)
    try:
        st.next_event(5)
        time.sleep(3.5)
        seqs = publish_ok(limits_dep.a, run, log("late"))
        assert [e["seq"] for e in sse_collect(st, run, seqs[-1])] == seqs
    finally:
        st.close()


def test_sse_many_streams_in_parallel(dep):
    runs = [uid() for _ in range(4)]
    streams = [open_sse(dep.b, r) for r in runs]
    try:
        for s in streams:
            s.next_event(5)
        exp = {r: publish_ok(dep.a, r, [log(r), progress(1, 1)]) for r in runs}
        for r, s in zip(runs, streams):
            assert [e["seq"] for e in sse_collect(s, r, exp[r][-1])] == exp[r]
    finally:
        for s in streams:
            s.close()

"""docs/protocol.md "WebSocket: GET /v1/ws": client frames, server frames and their fields."""

import json
import time

import pytest

import schema
from harness import (assert_alive, collect_events, expect_error_frame, get_json, log, progress,
                     publish_ok, subscribe, uid, ws)


def test_hello_is_first_and_has_documented_fields_and_defaults(dep):
    conns = []
    for gw in dep.gateways:
        c = ws(gw)
        conns.append(c)
        h = c.hello
        schema.check_hello(h)
        assert h["heartbeat_ms"] == 20000, h
        assert h["max_frame_bytes"] == 65536, h
        assert h["max_subscriptions"] == 256, h
        assert h["anonymous"] is True, f"anonymous gateway must say anonymous: true: {h}"
    c2 = ws(dep.a)
    conns.append(c2)
    assert c2.hello["connection"] != conns[0].hello["connection"], "connection ids should differ"
    for c in conns:
        c.close()


def test_subscribe_to_run_without_events_gets_null_state_then_live_events(dep):
    run = uid()
    c = ws(dep.b)
    st = subscribe(c, run)
    schema.check_state_frame(st, run)
    assert st["seq"] == 0 and st["state"] is None, st
    seqs = publish_ok(dep.a, run, [progress(1, 2), log("hi")])
    evs = collect_events(c, run, seqs[-1])
    for e in evs:
        schema.check_event(e, run)
    assert [e["seq"] for e in evs] == seqs
    assert [(e["kind"], e["data"]) for e in evs] == [("progress", {"done": 1, "total": 2}),
                                                    ("log", {"line": "hi"})]
    now_ms = time.time() * 1000
    assert all(abs(e["ts"] - now_ms) < 60_000 for e in evs), "ts is ms since the epoch"
    c.close()


def test_subscribe_sends_current_state_then_only_later_events(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [{"kind": "status", "data": {"state": "compiling"}},
                                   progress(3, 10)])
    c = ws(dep.b)
    st = subscribe(c, run)
    schema.check_state_frame(st, run)
    assert st["seq"] == seqs[-1], st
    s = st["state"]
    assert s["events"] == 2 and s["status"] == "running", s
    assert s["progress"] == {"done": 3, "total": 10} and s["last_status"] == {"state": "compiling"}
    assert s["percent"] == pytest.approx(30.0)
    more = publish_ok(dep.a, run, [progress(4, 10)])
    evs = collect_events(c, run, more[-1])
    assert [e["seq"] for e in evs] == more, "no replay without since; live events only"
    c.close()


def test_subscribe_with_since_replays_then_goes_live(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(i, 10) for i in range(1, 7)])
    c = ws(dep.b)
    st = subscribe(c, run, since=seqs[2])
    schema.check_state_frame(st, run)
    assert st["seq"] == seqs[-1], st
    live = publish_ok(dep.a, run, [progress(7, 10), progress(8, 10)])
    evs = collect_events(c, run, live[-1])
    assert [e["seq"] for e in evs] == seqs[3:] + live, "replay > since, then live, no gap or dup"
    assert [e["data"]["done"] for e in evs] == [4, 5, 6, 7, 8]
    c.close()


def test_since_zero_replays_everything_and_since_head_replays_nothing(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [log(str(i)) for i in range(4)])
    c = ws(dep.b)
    subscribe(c, run, since=0)
    assert [e["seq"] for e in collect_events(c, run, seqs[-1])] == seqs
    run2 = uid()
    seqs2 = publish_ok(dep.a, run2, [log("a"), log("b")])
    subscribe(c, run2, since=seqs2[-1])
    live = publish_ok(dep.a, run2, log("c"))
    assert [e["seq"] for e in collect_events(c, run2, live[-1])] == live
    c.close()


def test_since_zero_on_a_run_without_events_is_fine(dep):
    run = uid()
    c = ws(dep.b)
    st = subscribe(c, run, since=0)
    assert st["seq"] == 0 and st["state"] is None, st
    seqs = publish_ok(dep.a, run, log("first"))
    assert [e["seq"] for e in collect_events(c, run, seqs[-1])] == seqs
    c.close()


def test_unsubscribe_is_answered_and_stops_delivery(dep):
    run = uid()
    c = ws(dep.b)
    subscribe(c, run)
    c.send_json({"type": "unsubscribe", "run": run})
    f = c.expect("unsubscribed")
    assert f == {"type": "unsubscribed", "run": run}, f
    publish_ok(dep.a, run, log("after unsubscribe"))
    c.assert_quiet(0.7)
    # Subscribing again works (no already_subscribed).
    st = subscribe(c, run)
    assert st["state"]["events"] == 1
    c.close()


def test_ping_is_answered_with_pong(dep):
    c = ws(dep.a)
    c.send_json({"type": "ping"})
    assert c.recv_json(5) == {"type": "pong"}
    c.close()


def test_unknown_fields_are_ignored(dep):
    run = uid()
    c = ws(dep.b)
    c.send_json({"type": "ping", "request_id": 7, "x": {"y": [1]}})
    assert c.recv_json(5)["type"] == "pong"
    c.send_json({"type": "subscribe", "run": run, "request_id": "abc", "extra": None})
    st = c.expect("state")
    assert st["run"] == run
    c.send_json({"type": "unsubscribe", "run": run, "note": "bye"})
    assert c.expect("unsubscribed")["run"] == run
    c.close()


def test_many_runs_on_one_connection(dep):
    runs = [uid() for _ in range(5)]
    c = ws(dep.b)
    for r in runs:
        subscribe(c, r)
    expected = {}
    for r in runs:
        expected[r] = publish_ok(dep.a, r, [log(r), log(r + "!")])
    got = {r: [] for r in runs}
    deadline = time.monotonic() + 10
    while any(len(got[r]) < 2 for r in runs) and time.monotonic() < deadline:
        f = c.recv_json(max(0.01, deadline - time.monotonic()))
        if f["type"] == "event":
            got[f["run"]].append(f["seq"])
            assert f["data"]["line"].startswith(f["run"]), f
    assert got == expected
    c.close()


def test_every_subscriber_gets_the_same_events_in_order(dep):
    run = uid()
    subs = [ws(gw) for gw in dep.gateways for _ in range(2)]
    for c in subs:
        subscribe(c, run)
    seqs = []
    for i in range(10):
        seqs += publish_ok(dep.a, run, [progress(i * 5 + j, 50) for j in range(5)])
    for c in subs:
        evs = collect_events(c, run, seqs[-1])
        assert [e["seq"] for e in evs] == seqs
        assert [e["data"]["done"] for e in evs] == list(range(50))
        c.close()


def test_event_frames_equal_history_frames(dep):
    run = uid()
    c = ws(dep.b)
    subscribe(c, run)
    seqs = publish_ok(dep.a, run, [progress(1, 3), {"kind": "status", "data": {"state": "x"}}])
    live = collect_events(c, run, seqs[-1])
    from harness import get_json
    hist = get_json(dep.a, f"/v1/runs/{run}/events")["events"]
    assert live == hist, "an event frame is the same on the WebSocket and in history"
    c.close()


# ------------------------------------------------------------------------------ error frames


def _with_live_subscription(dep):
    run = uid()
    c = ws(dep.b)
    subscribe(c, run)
    return c, run


def _still_delivers(dep, c, run):
    seqs = publish_ok(dep.a, run, log("still here"))
    assert [e["seq"] for e in collect_events(c, run, seqs[-1])] == seqs
    assert_alive(c)


@pytest.mark.parametrize("text", ["not json", "{", '{"type":"ping"', "", "\ufeff{}", "[1,"],
                         ids=["word", "brace", "truncated", "empty", "bom", "array"])
def test_invalid_json_frame(dep, text):
    c, run = _with_live_subscription(dep)
    c.send_text(text)
    f = expect_error_frame(c, "invalid_json")
    schema.check_error_frame(f)
    _still_delivers(dep, c, run)
    c.close()


@pytest.mark.parametrize("frame", ["[]", "1", '"subscribe"', "null", "true", "{}", '{"type":5}',
                                   '{"type":null}', '{"type":["ping"]}', '{"run":"r1"}'])
def test_not_a_protocol_frame_is_invalid_frame(dep, frame):
    c, run = _with_live_subscription(dep)
    c.send_text(frame)
    expect_error_frame(c, "invalid_frame")
    _still_delivers(dep, c, run)
    c.close()


@pytest.mark.parametrize("type_", ["hello", "publish", "SUBSCRIBE", "pong", "", "event"])
def test_unknown_type(dep, type_):
    c, run = _with_live_subscription(dep)
    c.send_json({"type": type_, "run": run})
    expect_error_frame(c, "unknown_type")
    _still_delivers(dep, c, run)
    c.close()


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b", "é", "", "x" * 129, "a\nb"],
                         ids=lambda b: repr(b[:10]))
def test_subscribe_bad_run_id_is_invalid_run_id_echoing_run(dep, bad):
    c, run = _with_live_subscription(dep)
    c.send_json({"type": "subscribe", "run": bad})
    expect_error_frame(c, "invalid_run_id", run=bad)
    c.send_json({"type": "unsubscribe", "run": bad})
    expect_error_frame(c, "invalid_run_id", run=bad)
    _still_delivers(dep, c, run)
    c.close()


def test_error_run_is_cut_to_136_characters(dep):
    c, run = _with_live_subscription(dep)
    bad = "é" + "y" * 299
    c.send_json({"type": "subscribe", "run": bad})
    f = expect_error_frame(c, "invalid_run_id")
    assert f.get("run") == bad[:136], f"run should be echoed cut to 136 characters: {f.get('run')!r}"
    _still_delivers(dep, c, run)
    c.close()


def test_subscribe_without_run_is_invalid_run_id(dep):
    c, run = _with_live_subscription(dep)
    c.send_json({"type": "subscribe"})
    expect_error_frame(c, "invalid_run_id")
    c.send_json({"type": "unsubscribe"})
    expect_error_frame(c, "invalid_run_id")
    _still_delivers(dep, c, run)
    c.close()


@pytest.mark.parametrize("since", [-1, "5", 1.5, True, [1], {"n": 1}, "abc"])
def test_bad_since_is_invalid_since(dep, since):
    c, run = _with_live_subscription(dep)
    other = uid()
    publish_ok(dep.a, other, log("x"))
    c.send_json({"type": "subscribe", "run": other, "since": since})
    expect_error_frame(c, "invalid_since", run=other)
    # "a rejected frame changes nothing on the connection": the run is not subscribed.
    st = subscribe(c, other)
    assert st["seq"] >= 1
    _still_delivers(dep, c, run)
    c.close()


def test_since_past_last_seq_is_since_out_of_range(dep):
    c, run = _with_live_subscription(dep)
    other = uid()
    seqs = publish_ok(dep.a, other, [log("x"), log("y")])
    c.send_json({"type": "subscribe", "run": other, "since": seqs[-1] + 1})
    expect_error_frame(c, "since_out_of_range", run=other)
    c.send_json({"type": "subscribe", "run": uid(), "since": 5})
    expect_error_frame(c, "since_out_of_range")
    st = subscribe(c, other)  # not left subscribed by the rejected frame
    assert st["seq"] == seqs[-1]
    _still_delivers(dep, c, run)
    c.close()


def test_already_subscribed(dep):
    c, run = _with_live_subscription(dep)
    c.send_json({"type": "subscribe", "run": run})
    expect_error_frame(c, "already_subscribed", run=run)
    c.send_json({"type": "subscribe", "run": run, "since": 0})
    expect_error_frame(c, "already_subscribed", run=run)
    _still_delivers(dep, c, run)
    c.close()


def test_not_subscribed(dep):
    c, run = _with_live_subscription(dep)
    other = uid()
    c.send_json({"type": "unsubscribe", "run": other})
    expect_error_frame(c, "not_subscribed", run=other)
    _still_delivers(dep, c, run)
    c.close()


def test_binary_frame_is_binary_not_supported(dep):
    c, run = _with_live_subscription(dep)
    c.send_binary(b'{"type":"ping"}')
    expect_error_frame(c, "binary_not_supported")
    _still_delivers(dep, c, run)
    c.close()


def test_frame_over_max_frame_is_too_large_and_connection_stays(dep):
    c, run = _with_live_subscription(dep)
    c.send_json({"type": "ping", "pad": "x" * (70 * 1024)})
    expect_error_frame(c, "too_large")
    _still_delivers(dep, c, run)
    # Exactly max_frame_bytes is not "over" the limit.
    base = json.dumps({"type": "ping", "pad": ""})
    c.send_text(json.dumps({"type": "ping", "pad": "x" * (65536 - len(base))}))
    assert c.expect("pong")
    c.close()


def test_frame_over_hard_limit_closes_1009(dep):
    c, run = _with_live_subscription(dep)
    payload = json.dumps({"type": "ping", "pad": "x" * (1024 * 1024 + 16)}).encode()
    try:
        c.send_text(payload)
    except OSError:
        pass  # the server may stop reading and close while we still write
    cl = c.wait_close(10)
    assert cl.code == 1009, f"expected close 1009, got {cl.code} {cl.reason!r}"


def test_too_many_subscriptions_at_default_256(dep):
    c = ws(dep.b)
    runs = [uid("m") for _ in range(257)]
    for r in runs[:256]:
        c.send_json({"type": "subscribe", "run": r})
    for r in runs[:256]:
        f = c.expect("state", 10)
    c.send_json({"type": "subscribe", "run": runs[256]})
    expect_error_frame(c, "too_many_subscriptions", run=runs[256])
    seqs = publish_ok(dep.a, runs[0], log("x"))
    assert [e["seq"] for e in collect_events(c, runs[0], seqs[-1])] == seqs
    c.close()


def test_fragmented_text_frame_is_reassembled(dep):
    """RFC 6455 fragmentation: a message in two frames is one client frame."""
    c = ws(dep.a)
    c.send_frame(0x1, b'{"type":', fin=False)
    c.send_frame(0x0, b'"ping"}', fin=True)
    assert c.recv_json(5) == {"type": "pong"}
    c.close()


def test_client_close_is_answered(dep):
    c = ws(dep.a)
    c.send_close(1000)
    cl = c.wait_close(5)
    assert cl.code in (1000, None), cl


def test_state_frame_is_at_most_a_second_behind_and_the_rest_follows(dep):
    """The state sent on subscribe includes every event published before the subscribe, or (on
    NATS, docs: up to 1 s behind) is followed by every event after its seq: nothing is missed."""
    run = uid()
    stale = []
    for i in range(1, 5):
        seqs = publish_ok(dep.a, run, progress(i, 10))
        c = ws(dep.b)
        st = subscribe(c, run)
        if st["seq"] != seqs[-1] or st["state"]["events"] != i:
            stale.append((i, seqs[-1], st["seq"]))
            # Whatever the state says, the events after it must still come (no loss).
            evs = collect_events(c, run, seqs[-1], timeout=5)
            history = get_json(dep.a, f"/v1/runs/{run}/events?since=0")["events"]
            assert [e["seq"] for e in evs] == [e["seq"] for e in history if e["seq"] > st["seq"]]
        c.close()
    if dep.kind == "embedded":
        assert not stale, f"embedded state frames behind the stream: {stale}"


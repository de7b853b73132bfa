"""docs/protocol.md "HTTP API": every route, its success body, and its documented errors."""

import json
import time
from urllib.parse import quote

import pytest

import httpc
import schema
from harness import (assert_error, get_json, log, progress, publish, publish_ok, uid,
                     wait_until)


# ------------------------------------------------------------------------------ health


def test_healthz_is_200_ok(dep):
    for gw in dep.gateways:
        r = httpc.get(gw.url, "/healthz")
        assert r.status == 200, r
        assert r.text.strip() == "ok", r


def test_readyz_is_200_ready(dep):
    for gw in dep.gateways:
        r = httpc.get(gw.url, "/readyz")
        assert r.status == 200, r
        assert r.text.strip() == "ready", r


def test_metrics_is_prometheus_text(dep):
    r = httpc.get(dep.a.url, "/metrics")
    assert r.status == 200, r
    assert "# TYPE" in r.text or "# HELP" in r.text, r.text[:300]


def test_watch_page_is_html(dep):
    r = httpc.get(dep.a.url, "/")
    assert r.status == 200, r
    assert (r.header("content-type") or "").startswith("text/html"), r.headers


# ------------------------------------------------------------------------------ publish


def test_publish_one_event_returns_run_and_seqs(dep):
    run = uid()
    r = publish(dep.a, run, log("hello"))
    assert r.status == 200, r
    assert (r.header("content-type") or "").startswith("application/json"), r.headers
    doc = r.json()
    assert doc["run"] == run and isinstance(doc["seqs"], list) and len(doc["seqs"]) == 1, doc


def test_publish_batch_in_order_and_seqs_increase(dep):
    run = uid()
    s1 = publish_ok(dep.a, run, [progress(1), progress(2), progress(3)])
    s2 = publish_ok(dep.a, run, [log("x"), log("y")])
    assert s1 + s2 == sorted(s1 + s2) and len(set(s1 + s2)) == 5
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == s1 + s2
    assert [e["data"] for e in h["events"]][:3] == [{"done": i, "total": 100} for i in (1, 2, 3)]


def test_embedded_bus_numbers_each_run_1_2_3(dep):
    if dep.kind != "embedded":
        pytest.skip("docs: only the embedded bus numbers each run 1, 2, 3")
    run = uid()
    assert publish_ok(dep.a, run, [log("a"), log("b")]) == [1, 2]
    assert publish_ok(dep.a, run, log("c")) == [3]


def test_custom_kinds_accepted(dep):
    run = uid()
    for kind in ("progress", "log", "status", "my-kind_2", "k" * 64, "0"):
        r = publish(dep.a, run, {"kind": kind, "data": {"k": kind}})
        assert r.status == 200, (kind, r)
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    assert [e["kind"] for e in h["events"]] == ["progress", "log", "status", "my-kind_2", "k" * 64, "0"]


# ------------------------------------------------------------------------------ run state


def _state_at(gw, run, seq, timeout=5.0):
    """The run's state once it includes `seq` (bounded wait)."""
    box = {}

    def ok():
        box["s"] = get_json(gw, f"/v1/runs/{run}")
        return box["s"]["seq"] >= seq
    wait_until(ok, timeout, what=f"state of {run} at seq {seq}")
    return box["s"]


def test_run_state_fold(dep):
    # Freshness of state reads is test_state_read_is_never_behind_the_stream; here each read waits
    # (bounded) for the state to include the last publish, and checks the fold.
    run = uid()
    seqs = publish_ok(dep.a, run, [{"kind": "status", "data": {"state": "compiling"}},
                                   {"kind": "progress", "data": {"done": 3, "total": 10}}])
    s = _state_at(dep.b, run, seqs[-1])
    schema.check_run_state(s, run)
    assert s["status"] == "running", s
    assert s["events"] == 2, s
    assert s["percent"] == pytest.approx(30.0), s
    assert s["progress"] == {"done": 3, "total": 10}, s
    assert s["last_status"] == {"state": "compiling"}, s
    assert s.get("finished_ts") is None, s
    assert s["started_ts"] <= s["updated_ts"], s

    seqs = publish_ok(dep.a, run, {"kind": "complete", "data": {"findings": 0}})
    s = _state_at(dep.b, run, seqs[-1])
    assert s["status"] == "completed", s
    assert s["percent"] == pytest.approx(100.0), s
    assert s["result"] == {"findings": 0}, s
    assert schema.is_uint(s.get("finished_ts")), s
    assert s["seq"] == seqs[0] and s["events"] == 3, s

    # "a finished run stays finished"
    seqs = publish_ok(dep.a, run, [progress(5, 10), {"kind": "error", "data": {"message": "late"}}])
    s = _state_at(dep.b, run, seqs[-1])
    assert s["status"] == "completed", f"a finished run must stay finished: {s}"
    assert s["events"] == 5, s


def test_run_state_failed_after_error_event(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(1, 4), {"kind": "error", "data": {"message": "why"}}])
    s = _state_at(dep.b, run, seqs[-1])
    assert s["status"] == "failed", s
    assert s["result"] == {"message": "why"}, s
    assert schema.is_uint(s.get("finished_ts")), s


def test_run_state_percent_field(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, {"kind": "progress", "data": {"percent": 42.5}})
    s = _state_at(dep.b, run, seqs[-1])
    assert s["percent"] == pytest.approx(42.5), s


def test_state_read_is_at_most_a_second_behind_the_stream(dep):
    """docs (README, protocol.md): a state read adds the events the bucket has not folded; on NATS
    each gateway keeps a state it read for up to 1 s, so a state can be up to 1 s behind the stream,
    never more. Publish on one gateway, read the state on the other, repeatedly."""
    import time
    run = uid()
    stale = []

    def check(step, want_seq, want):
        s = get_json(dep.b, f"/v1/runs/{run}")
        if s["seq"] == want_seq and want(s):
            return
        if dep.kind == "embedded":
            stale.append((step, want_seq, s["seq"], "embedded state is never behind"))
            return
        time.sleep(1.2)
        s = get_json(dep.b, f"/v1/runs/{run}")
        if s["seq"] != want_seq or not want(s):
            stale.append((step, want_seq, s["seq"], "still behind after 1.2 s"))

    for i in range(1, 6):
        seqs = publish_ok(dep.a, run, [progress(i, 10)])
        check(i, seqs[-1], lambda s, i=i: s["events"] == i)
    seqs = publish_ok(dep.a, run, {"kind": "complete", "data": {}})
    check("complete", seqs[0], lambda s: s["status"] == "completed")
    assert not stale, f"state reads behind the stream (step, published seq, state seq, why): {stale}"


def test_state_of_unknown_run_is_404_run_not_found(dep):
    r = httpc.get(dep.b.url, f"/v1/runs/{uid()}")
    assert_error(r, 404, "run_not_found")


# ------------------------------------------------------------------------------ history


def test_history_page_fields(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(1), log("l"), {"kind": "status", "data": {"s": 1}}])
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    schema.check_history(h, run)
    assert [e["seq"] for e in h["events"]] == seqs
    assert [e["kind"] for e in h["events"]] == ["progress", "log", "status"]
    # `first` is not defined further by the docs; it cannot be after the first retained event.
    assert h["first"] <= seqs[0], h
    assert h["head"] == seqs[-1], h
    assert h["next_since"] == seqs[-1], h
    assert h["gap"] is None, h


def test_history_since_and_limit_paging(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(i) for i in range(7)])
    got, since = [], 0
    for _ in range(10):
        h = get_json(dep.b, f"/v1/runs/{run}/events?since={since}&limit=3")
        schema.check_history(h, run)
        assert len(h["events"]) <= 3
        if not h["events"]:
            break
        assert all(e["seq"] > since for e in h["events"]), h
        got += [e["seq"] for e in h["events"]]
        assert h["next_since"] == h["events"][-1]["seq"], h
        since = h["next_since"]
    assert got == seqs
    h = get_json(dep.b, f"/v1/runs/{run}/events?since={seqs[3]}")
    assert [e["seq"] for e in h["events"]] == seqs[4:]
    h = get_json(dep.b, f"/v1/runs/{run}/events?since={seqs[-1]}")
    assert h["events"] == [] and h["head"] == seqs[-1], h


def test_history_default_limit_100_and_max_1000(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [progress(i, 1001) for i in range(1000)])
    seqs += publish_ok(dep.a, run, [progress(1000, 1001)])
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    assert len(h["events"]) == 100, len(h["events"])
    assert h["next_since"] == seqs[99]
    h = get_json(dep.b, f"/v1/runs/{run}/events?limit=1000")
    assert len(h["events"]) == 1000
    # Reading: a limit above the maximum is either refused (400) or capped at 1000.
    r = httpc.get(dep.b.url, f"/v1/runs/{run}/events?limit=5000")
    if r.status == 200:
        assert len(r.json()["events"]) <= 1000, len(r.json()["events"])
    else:
        assert r.status == 400, r
        r.error()


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", "", "0x10", "1e3", "%201"])
def test_history_bad_since_is_400_invalid_since(dep, since):
    run = uid()
    publish_ok(dep.a, run, log("x"))
    r = httpc.get(dep.b.url, f"/v1/runs/{run}/events?since={since}")
    assert_error(r, 400, "invalid_since")


def test_history_since_past_last_seq_is_400_since_out_of_range(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [log("x"), log("y")])
    r = httpc.get(dep.b.url, f"/v1/runs/{run}/events?since={seqs[-1] + 1000}")
    assert_error(r, 400, "since_out_of_range")


@pytest.mark.parametrize("limit", ["abc", "-1", "1.5", "", "0"])
def test_history_bad_limit_is_400_invalid_query(dep, limit):
    """docs: invalid_query: `limit` not a positive integer."""
    run = uid()
    publish_ok(dep.a, run, log("x"))
    r = httpc.get(dep.b.url, f"/v1/runs/{run}/events?limit={limit}")
    assert_error(r, 400, "invalid_query")


# ------------------------------------------------------------------------------ run list


def _list(gw, query=""):
    doc = get_json(gw, "/v1/runs" + (("?" + query) if query else ""))
    assert isinstance(doc.get("runs"), list), doc
    for s in doc["runs"]:
        schema.check_run_state(s)
    return doc["runs"]


def test_run_list_status_filter_order_and_limit(dep):
    tag = uid("list")
    r_run, r_done, r_fail = tag + "-run", tag + "-done", tag + "-fail"
    publish_ok(dep.a, r_run, progress(1, 2))
    publish_ok(dep.a, r_done, [progress(1, 2), {"kind": "complete", "data": {}}])
    publish_ok(dep.a, r_fail, [progress(1, 2), {"kind": "error", "data": {"message": "x"}}])

    # docs: the list "may trail a brand-new run by a moment" (NATS); wait, bounded.
    def listed():
        names = {s["run"] for s in _list(dep.b, "limit=1000")}
        return {r_run, r_done, r_fail} <= names
    wait_until(listed, 10, what="runs listed")

    runs = _list(dep.b, "limit=1000")
    ts = [s["updated_ts"] for s in runs]
    assert ts == sorted(ts, reverse=True), "runs must be most recently updated first"

    for status, mine in (("running", r_run), ("completed", r_done), ("failed", r_fail)):
        got = _list(dep.b, f"status={status}&limit=1000")
        assert all(s["status"] == status for s in got), (status, got[:3])
        assert mine in {s["run"] for s in got}, (status, mine)
        others = {r_run, r_done, r_fail} - {mine}
        assert not (others & {s["run"] for s in got}), status

    assert len(_list(dep.b, "limit=1")) == 1
    assert len(_list(dep.b, "limit=2")) == 2


@pytest.mark.parametrize("query", ["status=bogus", "status=RUNNING", "limit=abc",
                                   "limit=-1", "limit=0", "limit=1.5"])
def test_run_list_bad_query_is_400_invalid_query(dep, query):
    """docs: invalid_query: `limit` not a positive integer, `status` not running/completed/failed."""
    r = httpc.get(dep.b.url, f"/v1/runs?{query}")
    assert_error(r, 400, "invalid_query")


# ------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v1/runs/r1/nope", "/v2/ws"])
def test_unknown_route_is_404_not_found(dep, path):
    r = httpc.get(dep.a.url, path)
    assert_error(r, 404, "not_found")


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/v1/runs/r1/events", {"POST", "GET"}),
    ("PUT", "/v1/runs/r1/events", {"POST", "GET"}),
    ("POST", "/v1/runs/r1", {"GET"}),
    ("DELETE", "/v1/runs/r1", {"GET"}),
    ("POST", "/v1/runs", {"GET"}),
    ("POST", "/v1/runs/r1/stream", {"GET"}),
    ("POST", "/v1/ws", {"GET"}),
    ("POST", "/healthz", {"GET"}),
    ("POST", "/readyz", {"GET"}),
    ("POST", "/metrics", {"GET"}),
    ("POST", "/", {"GET"}),
])
def test_wrong_method_is_405_with_allow(dep, method, path, allowed):
    r = httpc.request(dep.a.url, method, path, body=b"{}" if method in ("POST", "PUT") else None)
    assert_error(r, 405, "method_not_allowed")
    allow = r.header("allow")
    assert allow is not None, f"405 without Allow header: {r.headers}"
    got = {m.strip().upper() for m in allow.split(",") if m.strip()}
    assert allowed <= got, f"Allow {allow!r} should list {allowed}"
    assert method not in got, f"Allow {allow!r} lists the refused method"


def test_ws_route_without_upgrade_is_426_invalid_frame(dep):
    r = httpc.get(dep.a.url, "/v1/ws")
    assert_error(r, 426, "invalid_frame")


@pytest.mark.parametrize("variant", ["no_key", "bad_version", "no_version"])
def test_bad_websocket_handshake_is_400_invalid_frame(dep, variant):
    hdrs = {"Upgrade": "websocket", "Connection": "Upgrade"}
    if variant != "no_key":
        hdrs["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
    if variant == "bad_version":
        hdrs["Sec-WebSocket-Version"] = "12"
    elif variant == "no_key":
        hdrs["Sec-WebSocket-Version"] = "13"
    r = httpc.get(dep.a.url, "/v1/ws", headers=hdrs)
    assert_error(r, 400, "invalid_frame")


# ------------------------------------------------------------------------------ run IDs

BAD_IDS = ["a.b", "*", ">", "a b", "é", "x" * 129, "a:b", "a+b", "a%b", "a\u0000b"]


def _enc(run):
    return quote(run, safe="")


@pytest.mark.parametrize("run", BAD_IDS, ids=lambda r: repr(r[:12]))
def test_bad_run_id_is_400_invalid_run_id_on_every_route(dep, run):
    p = _enc(run)
    for method, path, body in [("POST", f"/v1/runs/{p}/events", log("x")),
                               ("GET", f"/v1/runs/{p}", None),
                               ("GET", f"/v1/runs/{p}/events", None),
                               ("GET", f"/v1/runs/{p}/stream", None)]:
        r = httpc.request(dep.a.url, method, path, body=body)
        assert r.status == 400, f"{method} {path}: {r}"
        assert r.error()["code"] == "invalid_run_id", f"{method} {path}: {r}"


def test_empty_run_id_is_invalid_run_id(dep):
    for method, path, body in [("POST", "/v1/runs//events", log("x")),
                               ("GET", "/v1/runs//events", None),
                               ("GET", "/v1/runs//stream", None)]:
        r = httpc.request(dep.a.url, method, path, body=body)
        assert_error(r, 400, "invalid_run_id")


def test_run_id_of_128_characters_is_accepted(dep):
    run = ("A-z_9" * 30)[:128]
    run = run[:100] + uid()[2:14] + run[112:]
    assert len(run) == 128
    publish_ok(dep.a, run, log("x"))
    s = get_json(dep.b, f"/v1/runs/{run}")
    assert s["run"] == run


# ------------------------------------------------------------------------------ bad publish bodies


@pytest.mark.parametrize("body,code", [
    (b"not json", "invalid_json"),
    (b'{"kind":"log","data":1', "invalid_json"),
    (b"", "invalid_json"),
    (b'{"kind":"log","data":1} x', "invalid_json"),
    (b'{"kind":"log","data":"\xff\xfe"}', "invalid_json"),
    (b"42", "invalid_event"),
    (b'"text"', "invalid_event"),
    (b"null", "invalid_event"),
    (b"[]", "invalid_event"),
    (b"[1,2]", "invalid_event"),
    (b'{"kind":"log"}', "invalid_event"),
    (b'{"data":1}', "invalid_kind"),
    (b'{"kind":5,"data":1}', "invalid_kind"),
    (b'{"kind":null,"data":1}', "invalid_kind"),
    (b'{"kind":"Progress","data":1}', "invalid_kind"),
    (b'{"kind":"","data":1}', "invalid_kind"),
    (b'{"kind":"a.b","data":1}', "invalid_kind"),
    (b'{"kind":"a b","data":1}', "invalid_kind"),
    (b'{"kind":"' + b"k" * 65 + b'","data":1}', "invalid_kind"),
    (b'[{"kind":"log","data":1},{"kind":"BAD","data":1}]', "invalid_kind"),
    (b'[{"kind":"log","data":1},{"kind":"log"}]', "invalid_event"),
], ids=lambda x: x[:24].decode("latin-1") if isinstance(x, bytes) else x)
def test_bad_publish_body_is_refused_and_stores_nothing(dep, body, code):
    run = uid()
    r = publish(dep.a, run, None, raw=body)
    assert_error(r, 400, code)
    # "A rejected publish stores nothing (batches are all or nothing)"
    assert_error(httpc.get(dep.b.url, f"/v1/runs/{run}"), 404, "run_not_found")


def test_rejected_batch_leaves_existing_run_unchanged(dep):
    run = uid()
    seqs = publish_ok(dep.a, run, [log("a"), log("b")])
    r = publish(dep.a, run, [log("c"), {"kind": "NOPE", "data": 1}, log("d")])
    assert_error(r, 400, "invalid_kind")
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == seqs
    assert get_json(dep.b, f"/v1/runs/{run}")["events"] == 2


def test_publish_body_over_max_publish_is_413_too_large(dep):
    run = uid()
    body = json.dumps({"kind": "log", "data": {"pad": "x" * (1024 * 1024)}}).encode()
    assert len(body) > 1024 * 1024
    r = publish(dep.a, run, None, raw=body)
    assert_error(r, 413, "too_large")
    assert_error(httpc.get(dep.b.url, f"/v1/runs/{run}"), 404, "run_not_found")


@pytest.mark.parametrize("expect_continue", [False, True])
def test_oversized_content_length_is_refused_before_the_body(dep, expect_continue):
    """docs: a publish body over --max-publish is "refused from its Content-Length before any of it
    is read, without `100 Continue`", and the connection is closed (after the body, if the client
    sends it)."""
    import socket
    s = httpc.connect(dep.a.url, 5)
    extra = "Expect: 100-continue\r\n" if expect_continue else ""
    s.sendall((f"POST /v1/runs/{uid()}/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"{extra}Content-Length: {2 * 1024 * 1024}\r\n\r\n").encode())
    t0 = time.monotonic()
    r = httpc._Reader(s)
    head = r.read_until(b"\r\n\r\n", time.monotonic() + 5)
    version, status, reason, headers = httpc.parse_head(head)
    assert status != 100, "the server sent 100 Continue for an oversized body"
    resp = httpc.StreamResponse(s, r, version, status, reason, headers)
    body = resp.read_all(5)
    assert time.monotonic() - t0 < 3, "not refused at once"
    assert_error(httpc.Response(status, reason, headers, body), 413, "too_large")
    if not expect_continue:
        # docs: without Expect the client is sending its body; the server discards it, so the
        # client can read the answer, and closes once it is sent.
        s.sendall(b"x" * (2 * 1024 * 1024))
    s.settimeout(3)
    try:
        rest = s.recv(100)
    except (ConnectionResetError, socket.timeout) as e:
        rest = repr(e).encode()
    s.close()
    assert rest == b"", f"connection not closed after the 413: {rest!r}"


def test_publish_over_max_batch_is_413_too_many_events(dep):
    run = uid()
    r = publish(dep.a, run, [log(str(i)) for i in range(1001)])
    assert_error(r, 413, "too_many_events")
    assert_error(httpc.get(dep.b.url, f"/v1/runs/{run}"), 404, "run_not_found")


def test_publish_accepts_form_content_type_and_no_content_type(dep):
    """The README's curl line sends curl's default application/x-www-form-urlencoded."""
    run = uid()
    body = b'{"kind":"log","data":{"line":"hello"}}'
    for ct in ("application/x-www-form-urlencoded", None):
        h = {} if ct is None else {"Content-Type": ct}
        r = httpc.request(dep.a.url, "POST", f"/v1/runs/{run}/events", body=body, headers=h)
        assert r.status == 200, (ct, r)


# ------------------------------------------------------------------------------ traceparent

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_traceparent_header_and_field_reach_event_frames(dep):
    run = uid()
    publish_ok(dep.a, run, log("with header"), headers={"traceparent": TP})
    publish_ok(dep.a, run, {"kind": "log", "data": {"line": "with field"}, "traceparent": TP2})
    publish_ok(dep.a, run, log("without"))
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    ev = h["events"]
    assert ev[0].get("traceparent", "").split("-")[1:2] == [TP.split("-")[1]], ev[0]
    assert ev[1].get("traceparent", "").split("-")[1:2] == [TP2.split("-")[1]], ev[1]
    assert "traceparent" not in ev[2], f"traceparent is only added when the publisher sent one: {ev[2]}"


# ------------------------------------------------------------------------------ safe retries
# docs/protocol.md "Safe retries": an Idempotency-Key header or an event `id`.


def test_retry_with_idempotency_key_is_stored_once_even_on_another_gateway(dep):
    run = uid("idem")
    batch = [log("a"), log("b")]
    key = {"Idempotency-Key": uid("key")}
    first = publish_ok(dep.a, run, batch, headers=key)
    # The retry reaches the other gateway, as it would behind a load balancer.
    again = publish_ok(dep.b, run, batch, headers=key)
    assert again == first
    h = get_json(dep.a, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == first
    assert all("id" not in e for e in h["events"]), h


def test_event_ids_dedupe_per_run_and_events_without_ids_do_not(dep):
    run, other = uid("idem"), uid("idem")
    ev = dict(log("x"), id="step-1")
    s1 = publish_ok(dep.a, run, [ev])
    assert publish_ok(dep.b, run, [ev]) == s1
    publish_ok(dep.a, other, [ev])
    plain = publish_ok(dep.a, run, [log("y")])
    assert publish_ok(dep.a, run, [log("y")]) != plain
    assert len(get_json(dep.b, f"/v1/runs/{other}/events")["events"]) == 1
    assert len(get_json(dep.b, f"/v1/runs/{run}/events")["events"]) == 3


@pytest.mark.parametrize("headers,event", [
    ({"Idempotency-Key": "has space"}, log("x")),
    ({"Idempotency-Key": "k" * 121}, log("x")),
    ({}, dict(log("x"), id="")),
    ({}, dict(log("x"), id=7)),
    ({}, dict(log("x"), id="é")),
])
def test_bad_idempotency_keys_are_400_invalid_event(dep, headers, event):
    run = uid("idem")
    r = publish(dep.a, run, [event], headers=headers)
    assert_error(r, 400, "invalid_event")

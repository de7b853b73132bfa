"""Data fidelity: "`data` is any JSON and reaches clients verbatim (same bytes, same key order, same
spacing)" (docs/protocol.md Concepts), over WebSocket, SSE (through the spec parser), history and
run state (`progress`, `last_status`, `result`: "verbatim").

Each value is published with several encodings of the request body: compact, Python's default
spacing, pretty-printed (indent=2, LF) and pretty-printed with CRLF between tokens.
"""

import json
from decimal import Decimal

import pytest

import httpc
from harness import open_sse, publish, subscribe, uid, ws

VALUES = {
    "nested": {"a": {"b": [1, {"c": None, "d": [True, False]}], "e": {}}, "f": [], "g": [[[]]]},
    "unicode": {"s": "héllo wörld ✓ 日本語 😀 \u00a0", "k\u00e9y": "v", "😀": "emoji key"},
    "escapes": {"q": "quote\" back\\ slash / tab\t nl\n cr\r crlf\r\n ff\f bs\b",
                "ctl": "\u0000\u0001\u001f\u007f", "ls": "\u2028\u2029", "html": "</script><!--",
                "sse": "\ndata: fake\n\nid: 999\n\n: comment\r"},
    "numbers": {"zero": 0, "neg": -17, "big": 12345678901234567890,
                "huge": 123456789012345678901234567890, "f": 1.5, "small": 1e-7, "negz": -0.0,
                "float_int": 1.0, "max": 1.7976931348623157e308, "exp": 6.02e23},
    "null": None,
    "string": "just a string",
    "number": 42,
    "float": 3.25,
    "false": False,
    "array": [1, "two", None, [3.5], {"x": []}],
    "empty_obj": {},
    "empty_arr": [],
    "empty_str": "",
    "key_order": {"z": 1, "a": 2, "m": {"y": 1, "b": 2, "0": 3}, "_": None},
}

ENCODINGS = ["compact", "spaced", "pretty", "pretty_crlf", "ascii_escaped"]


def encode(value, enc) -> bytes:
    if enc == "compact":
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if enc == "spaced":
        return json.dumps(value, ensure_ascii=False).encode()
    if enc == "pretty":
        return json.dumps(value, indent=2, ensure_ascii=False).encode()
    if enc == "pretty_crlf":
        return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\r\n").encode()
    if enc == "ascii_escaped":
        return json.dumps(value, indent=1).encode()
    raise ValueError(enc)


def event_body(kind, data_bytes, enc) -> bytes:
    if enc.startswith("pretty"):
        nl = b"\r\n" if enc == "pretty_crlf" else b"\n"
        return b"{" + nl + b'  "kind": "' + kind.encode() + b'",' + nl + b'  "data": ' + data_bytes + nl + b"}"
    return b'{"kind":"' + kind.encode() + b'","data":' + data_bytes + b"}"


def batch_body(items, enc) -> bytes:
    nl = b"\r\n" if enc == "pretty_crlf" else (b"\n" if enc == "pretty" else b"")
    return b"[" + nl + (b"," + nl).join(event_body(k, d, enc) for k, d in items) + nl + b"]"


def ordered(text_or_bytes):
    """Parse JSON keeping key order and exact numbers, for order-sensitive comparison."""
    return json.loads(text_or_bytes, object_pairs_hook=lambda pairs: ("obj", tuple(pairs)),
                      parse_float=Decimal)


def ordered_value(v):
    return ordered(json.dumps(v))


@pytest.fixture(scope="module")
def published(dep):
    """One run per encoding, one `log` event per value, published as one batch."""
    out = {}
    for enc in ENCODINGS:
        run = uid("fid")
        items = [(name, encode(v, enc)) for name, v in VALUES.items()]
        r = publish(dep.a, run, None, raw=batch_body([("log", d) for _, d in items], enc))
        assert r.status == 200, (enc, r)
        seqs = r.json()["seqs"]
        out[enc] = (run, items, seqs)
    return out


def _compare(frames, items, where):
    """frames: list of (raw frame text, parsed frame) for the run's events, in order."""
    bad = []
    assert len(frames) == len(items), f"{where}: {len(frames)} events for {len(items)} published"
    for (raw, _), (name, data_bytes) in zip(frames, items):
        got = ordered(raw)
        got_data = dict(got[1])["data"]
        exp = ordered(data_bytes)
        if got_data != exp:
            bad.append((name, data_bytes[:120], json.dumps(json.loads(raw)["data"])[:120]))
    assert not bad, f"{where}: values changed (name, sent, received): {bad}"


@pytest.mark.parametrize("enc", ENCODINGS)
def test_history_returns_the_same_json_values(dep, published, enc):
    run, items, seqs = published[enc]
    r = httpc.get(dep.b.url, f"/v1/runs/{run}/events?limit=1000")
    assert r.status == 200, r
    doc = json.loads(r.body)
    raws = [json.dumps(e) for e in doc["events"]]
    # Order-sensitive: re-parse the raw body event by event.
    body = ordered(r.body)
    evs = dict(body[1])["events"]
    bad = []
    for ev, (name, data_bytes) in zip(evs, items):
        if dict(ev[1])["data"] != ordered(data_bytes):
            bad.append((name, data_bytes[:100]))
    assert len(evs) == len(items)
    assert not bad, f"history changed values or key order: {bad}"
    del raws


@pytest.mark.parametrize("enc", ENCODINGS)
def test_websocket_returns_the_same_json_values(dep, published, enc):
    run, items, seqs = published[enc]
    c = ws(dep.b)
    subscribe(c, run, since=0)
    frames = []
    while len(frames) < len(items):
        t = c.recv_text(5)
        f = json.loads(t)
        if f["type"] == "event":
            frames.append((t, f))
    c.close()
    _compare(frames, items, "websocket")


@pytest.mark.parametrize("enc", ENCODINGS)
def test_sse_returns_the_same_json_values(dep, published, enc):
    run, items, seqs = published[enc]
    st = open_sse(dep.b, run, "since=0")
    frames = []
    try:
        while len(frames) < len(items):
            ev = st.next_event(5)
            assert ev is not None, "stream ended"
            try:
                f = json.loads(ev.data)
            except ValueError as e:
                raise AssertionError(
                    f"SSE message {len(frames) + 1} is not a JSON frame once parsed per the SSE spec "
                    f"({e}); data={ev.data[:200]!r}; stray fields so far: "
                    f"{[n for n, _ in st.parser.fields_seen if n not in ('data', 'id', 'retry')][:5]}"
                ) from None
            if f["type"] == "event":
                frames.append((ev.data, f))
    finally:
        st.close()
    _compare(frames, items, "sse")


@pytest.mark.parametrize("enc", ["compact", "spaced", "pretty", "pretty_crlf", "ascii_escaped"])
def test_data_bytes_are_verbatim_on_websocket_and_history(dep, published, enc):
    """"same bytes, same key order, same spacing": the data's bytes appear unchanged inside the
    WebSocket text frame and the history body."""
    run, items, seqs = published[enc]
    c = ws(dep.b)
    subscribe(c, run, since=0)
    texts = []
    while len(texts) < len(items):
        t = c.recv_text(5)
        if json.loads(t)["type"] == "event":
            texts.append(t.encode())
    c.close()
    hist = httpc.get(dep.b.url, f"/v1/runs/{run}/events?limit=1000").body
    bad = []
    for t, (name, data_bytes) in zip(texts, items):
        if data_bytes not in t:
            bad.append(("ws", name))
        if data_bytes not in hist:
            bad.append(("history", name))
    assert not bad, f"data not byte-for-byte verbatim: {bad}"


@pytest.mark.parametrize("enc", ["compact", "pretty_crlf"])
def test_run_state_keeps_progress_status_and_result_verbatim(dep, enc):
    bad = []
    for name, v in VALUES.items():
        run = uid("fst")
        d = encode(v, enc)
        body = batch_body([("progress", d), ("status", d), ("complete", d)], enc)
        r = publish(dep.a, run, None, raw=body)
        if r.status != 200:
            bad.append((name, "publish", r.status, r.body[:100]))
            continue
        exp = ordered(d)
        # HTTP state
        rs = httpc.get(dep.b.url, f"/v1/runs/{run}")
        if rs.status != 200:
            bad.append((name, "GET state", rs.status, rs.body[:100]))
            continue
        s = dict(ordered(rs.body)[1])
        for field in ("progress", "last_status", "result"):
            if s.get(field, "<absent>") != exp:
                bad.append((name, "http", field, json.dumps(json.loads(rs.body).get(field, "<absent>"))[:100]))
        # WebSocket state frame
        c = ws(dep.b)
        c.send_json({"type": "subscribe", "run": run})
        t = c.recv_text(5)
        c.close()
        st = dict(dict(ordered(t)[1])["state"][1])
        for field in ("progress", "last_status", "result"):
            if st.get(field, "<absent>") != exp:
                bad.append((name, "ws state", field, json.dumps(json.loads(t)["state"].get(field, "<absent>"))[:100]))
        # SSE state frame
        ss = open_sse(dep.b, run)
        try:
            ev = ss.next_event(5)
        finally:
            ss.close()
        st = dict(dict(ordered(ev.data)[1])["state"][1])
        for field in ("progress", "last_status", "result"):
            if st.get(field, "<absent>") != exp:
                bad.append((name, "sse state", field, json.dumps(json.loads(ev.data)["state"].get(field, "<absent>"))[:100]))
    assert not bad, f"state fields not verbatim (value, where, field, got): {bad}"


def test_sse_data_with_newlines_is_split_into_data_lines(dep, published):
    """A pretty-printed value must not break SSE framing: the parser must see one message per frame
    (no stray fields such as a fake `id:` injected by data containing newlines)."""
    run, items, seqs = published["pretty_crlf"]
    st = open_sse(dep.b, run, "since=0")
    try:
        ids = []
        n = 0
        while n < len(items):
            ev = st.next_event(5)
            try:
                f = json.loads(ev.data)
            except ValueError:
                raise AssertionError(f"SSE data is not JSON after spec parsing: {ev.data[:200]!r}; "
                                     f"fields seen: {st.parser.fields_seen[-6:]}") from None
            if f["type"] == "event":
                n += 1
                ids.append((ev.last_event_id, str(f["seq"])))
        fields = {name for name, _ in st.parser.fields_seen}
    finally:
        st.close()
    assert all(a == b for a, b in ids), f"ids do not match seqs: {ids}"
    assert fields <= {"data", "id", "retry"}, f"unexpected SSE fields: {fields}"

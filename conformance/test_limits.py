"""Limits and timeouts: README "Configuration", docs/protocol.md "Heartbeats", "Flow control",
"Size limits", docs/security.md "Limits and their defaults".

limits_dep runs with: heartbeat 1s/1s, --max-frame 1KiB, --max-subscriptions 4, --max-publish 8KiB,
--max-batch 5, --request-timeout 1s, --header-read-timeout 1s, --handshake-timeout 1s.
"""

import json
import socket
import time

import pytest

import httpc
from harness import (assert_alive, assert_error, collect_events, expect_error_frame, log,
                     open_sse, publish, publish_ok, sse_collect, subscribe, uid, ws)
from wsclient import WS, HandshakeRejected


def test_hello_reflects_the_flags(limits_dep):
    c = ws(limits_dep.a)
    assert c.hello["heartbeat_ms"] == 1000, c.hello
    assert c.hello["max_frame_bytes"] == 1024, c.hello
    assert c.hello["max_subscriptions"] == 4, c.hello
    c.close()


def test_silent_client_is_closed_4001(limits_dep):
    c = ws(limits_dep.a, auto_pong=False)
    t0 = time.monotonic()
    cl = c.wait_close(8)
    dt = time.monotonic() - t0
    assert cl.code == 4001, f"expected close 4001, got {cl.code} {cl.reason!r}"
    assert 1.0 <= dt <= 4.5, f"closed after {dt:.2f}s; interval + timeout is 2 s"


def test_server_pings_and_a_client_answering_them_stays_open(limits_dep):
    c = ws(limits_dep.a)  # auto_pong answers server pings
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.5:
        try:
            m = c.recv(0.2)
            assert m.kind not in ("close", "eof"), m
        except Exception as e:  # noqa: BLE001
            if "close" in repr(e) or "eof" in repr(e):
                raise
    assert len(c.pings) >= 3, f"expected WebSocket pings every 1 s, got {len(c.pings)} in 4.5 s"
    assert_alive(c)
    c.close()


def test_text_frames_count_as_sign_of_life(limits_dep):
    """"Any frame from the client (a pong ... or any text frame) counts as a sign of life"."""
    c = ws(limits_dep.a, auto_pong=False)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.5:
        c.send_json({"type": "ping"})
        try:
            while True:
                m = c.recv(0.4)
                assert m.kind not in ("close", "eof"), f"closed although the client kept sending: {m}"
        except Exception as e:  # noqa: BLE001
            if "closed although" in str(e):
                raise
    c.close()


def test_too_large_at_max_frame_and_exact_limit_ok(limits_dep):
    c = ws(limits_dep.a)
    run = uid()
    subscribe(c, run)
    base = json.dumps({"type": "ping", "pad": ""})
    c.send_text(json.dumps({"type": "ping", "pad": "x" * (1024 - len(base))}))
    assert c.expect("pong")["type"] == "pong"
    c.send_text(json.dumps({"type": "ping", "pad": "x" * (1025 - len(base))}))
    expect_error_frame(c, "too_large")
    # The hard limit stays 1 MiB when --max-frame is smaller.
    c.send_text(json.dumps({"type": "ping", "pad": "x" * (512 * 1024)}))
    expect_error_frame(c, "too_large")
    seqs = publish_ok(limits_dep.a, run, log("x"))
    assert [e["seq"] for e in collect_events(c, run, seqs[-1])] == seqs
    c.close()


def test_subscription_limit_and_unsubscribe_frees_a_slot(limits_dep):
    c = ws(limits_dep.a)
    runs = [uid() for _ in range(5)]
    for r in runs[:4]:
        subscribe(c, r)
    c.send_json({"type": "subscribe", "run": runs[4]})
    expect_error_frame(c, "too_many_subscriptions", run=runs[4])
    c.send_json({"type": "unsubscribe", "run": runs[0]})
    assert c.expect("unsubscribed")["run"] == runs[0]
    subscribe(c, runs[4])
    c.close()


def test_max_publish_and_max_batch_flags(limits_dep):
    gw = limits_dep.a
    run = uid()
    assert_error(publish(gw, run, {"kind": "log", "data": "x" * 9000}), 413, "too_large")
    assert_error(publish(gw, run, [log(str(i)) for i in range(6)]), 413, "too_many_events")
    assert publish(gw, run, [log(str(i)) for i in range(5)]).status == 200


def test_slow_request_body_is_408_and_connection_closed(limits_dep):
    gw = limits_dep.a
    s = httpc.connect(gw.url, 10)
    s.sendall(("POST /v1/runs/%s/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               "Content-Length: 100\r\n\r\n{\"kind\":" % uid()).encode())
    t0 = time.monotonic()
    r = httpc._Reader(s)
    head = r.read_until(b"\r\n\r\n", time.monotonic() + 6)
    version, status, reason, headers = httpc.parse_head(head)
    resp = httpc.StreamResponse(s, r, version, status, reason, headers)
    body = resp.read_all(5)
    dt = time.monotonic() - t0
    assert_error(httpc.Response(status, reason, headers, body), 408, "request_timeout")
    assert dt < 4, f"408 after {dt:.1f}s with --request-timeout 1s"
    # "the connection is closed"
    s.settimeout(3)
    try:
        rest = s.recv(100)
    except (ConnectionResetError, socket.timeout) as e:
        rest = repr(e).encode()
    s.close()
    assert rest == b"", f"connection not closed after 408: {rest!r}"
    m = httpc.get(gw.url, "/metrics").text
    assert 'runcast_timeouts_total{stage="request_body"}' in m, "security.md names this metric"


def _closed_within(sock, seconds):
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while True:
            d = sock.recv(4096)
            if not d:
                return time.monotonic() - t0, b""
    except ConnectionResetError:
        return time.monotonic() - t0, b""
    except socket.timeout:
        return None, b""


def test_silent_connection_is_closed_after_handshake_timeout(limits_dep):
    s = socket.create_connection(("127.0.0.1", limits_dep.a.port), timeout=5)
    dt, _ = _closed_within(s, 6)
    s.close()
    assert dt is not None, "a silent connection was not closed within 6 s (--handshake-timeout 1s)"
    assert dt < 4, dt


def test_slow_headers_are_closed_after_header_read_timeout(limits_dep):
    s = socket.create_connection(("127.0.0.1", limits_dep.a.port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    # Trickle one header byte at a time; the headers never end.
    closed = None
    while time.monotonic() - t0 < 6:
        try:
            s.sendall(b"X")
        except OSError:
            closed = time.monotonic() - t0
            break
        s.settimeout(0.3)
        try:
            d = s.recv(4096)
            if not d or b"HTTP/1.1" in d:
                closed = time.monotonic() - t0
                break
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = time.monotonic() - t0
            break
    s.close()
    assert closed is not None, "headers trickled for 6 s were not cut off (--header-read-timeout 1s)"
    assert closed < 4, closed


# ------------------------------------------------------------------------------ slow consumers


def _flood(gw, run, total_bytes, size=60_000):
    seqs = []
    per = max(1, (900 * 1024) // (size + 100))
    n = max(1, total_bytes // size)
    pad = "p" * size
    i = 0
    while i < n:
        k = min(per, n - i)
        seqs += publish_ok(gw, run, [{"kind": "log", "data": {"i": i + j, "pad": pad}} for j in range(k)])
        i += k
    return seqs


def test_slow_websocket_consumer_is_closed_4000_and_resumes_without_loss(slow_dep):
    gw = slow_dep.a
    run = uid("slow")
    c = ws(gw, rcvbuf=4096)
    st = subscribe(c, run)
    cursor = st["seq"]
    seqs = _flood(gw, run, 12 * 1024 * 1024)
    got = []
    code = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = c.recv(10)
        if m.kind == "text":
            f = json.loads(m.text)
            if f["type"] == "event":
                got.append(f["seq"])
                cursor = f["seq"]
        elif m.kind in ("close", "eof"):
            code = m.code
            break
    assert code == 4000, f"expected close 4000 (slow consumer), got {code} after {len(got)} events"
    assert got == seqs[:len(got)], "delivered events must be a prefix, in order"
    c2 = ws(gw)
    subscribe(c2, run, since=cursor)
    rest = [e["seq"] for e in collect_events(c2, run, seqs[-1], timeout=30)]
    c2.close()
    assert got + rest == seqs


def test_slow_sse_consumer_stream_ends_and_resumes_without_loss(slow_dep):
    gw = slow_dep.a
    run = uid("slows")
    st = open_sse(gw, run, rcvbuf=4096)
    st.next_event(5)
    seqs = _flood(gw, run, 12 * 1024 * 1024)
    got = []
    ended = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ev = st.next_event(10)
        except TimeoutError:
            break
        if ev is None:
            ended = True
            break
        f = json.loads(ev.data)
        if f["type"] == "event":
            got.append(f["seq"])
            if f["seq"] == seqs[-1]:
                break
    last = st.last_event_id
    st.close()
    assert ended, f"the stream of a slow SSE client did not end (got {len(got)} of {len(seqs)} events)"
    assert got == seqs[:len(got)]
    st2 = open_sse(gw, run, headers={"Last-Event-ID": last})
    st2.next_event(5)
    rest = [e["seq"] for e in sse_collect(st2, run, seqs[-1], timeout=30)]
    st2.close()
    assert got + rest == seqs


# ------------------------------------------------------------------------------ sessions


def _expect_429(resp):
    assert_error(resp, 429, "rate_limited")
    ra = resp.header("retry-after")
    assert ra is not None and ra.strip().isdigit(), f"429 needs Retry-After: {resp.headers}"


def test_max_sessions_per_ip(caps_dep):
    gw = caps_dep.a
    held = [ws(gw), ws(gw), open_sse(gw, uid())]
    try:
        assert held[2].status == 200
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url)
        _expect_429(ei.value.response)
        st = open_sse(gw, uid())
        _expect_429(st.resp)
        st.close()
        # plain HTTP is not a session
        assert httpc.get(gw.url, "/healthz").status == 200
        assert "runcast_refused_sessions_total" in httpc.get(gw.url, "/metrics").text
    finally:
        held[0].close()
    # a freed slot can be used again (bounded wait for the server to notice)
    deadline = time.monotonic() + 5
    while True:
        try:
            c = ws(gw)
            c.close()
            break
        except HandshakeRejected:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    held[1].close()
    held[2].close()


def test_session_rate_per_ip(rate_dep):
    gw = rate_dep.a
    statuses = []
    first_429 = None
    for i in range(10):
        try:
            c = WS.connect(gw.url)
            c.abort()
            statuses.append(101)
        except HandshakeRejected as e:
            statuses.append(e.status)
            first_429 = first_429 or e.response
    assert statuses[:4] == [101] * 4, f"burst is twice the rate (4): {statuses}"
    assert first_429 is not None, f"no 429 in 10 sessions opened at once at 2/s: {statuses}"
    _expect_429(first_429)


def test_max_connections_is_503_capacity_with_retry_after(conn_dep):
    gw = conn_dep.a
    held = []
    try:
        for _ in range(3):
            held.append(ws(gw))
        r = httpc.get(gw.url, "/healthz")
        assert_error(r, 503, "capacity")
        assert r.header("retry-after") is not None, f"503 needs Retry-After: {r.headers}"
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 5
    while httpc.get(gw.url, "/healthz").status != 200:
        assert time.monotonic() < deadline, "capacity not freed after closing connections"
        time.sleep(0.1)


# ------------------------------------------------------------------------------ trusted proxies


@pytest.fixture(scope="module", params=["embedded"] if "embedded" in __import__("conftest").KINDS else [])
def proxy_dep(request, launcher):
    d = launcher.deploy(request.param, ["--max-sessions-per-ip", "1", "--trusted-proxy",
                                        "127.0.0.1/32"], n=1)
    yield d
    d.stop()


def test_trusted_proxy_x_forwarded_for_names_the_client(proxy_dep):
    gw = proxy_dep.a
    a = ws(gw, headers={"X-Forwarded-For": "10.0.0.1"})
    b = ws(gw, headers={"X-Forwarded-For": "10.0.0.2"})  # another client: allowed
    try:
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url, headers={"X-Forwarded-For": "10.0.0.1"})
        _expect_429(ei.value.response)
        # entries left of the rightmost untrusted one can be forged and are ignored
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url, headers={"X-Forwarded-For": "10.9.9.9, 10.0.0.1"})
        _expect_429(ei.value.response)
        # trusted proxies in the chain are skipped: the client is 10.0.0.2
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url, headers={"X-Forwarded-For": "10.0.0.2, 127.0.0.1"})
        _expect_429(ei.value.response)
    finally:
        a.close()
        b.close()


def test_untrusted_peer_x_forwarded_for_is_ignored(caps_dep):
    """caps_dep (3 sessions per address) has no --trusted-proxy: forged headers do not help."""
    gw = caps_dep.a
    held = [ws(gw, headers={"X-Forwarded-For": f"10.1.0.{i}"}) for i in range(3)]
    try:
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url, headers={"X-Forwarded-For": "10.1.0.99"})
        _expect_429(ei.value.response)
    finally:
        for c in held:
            c.close()
    time.sleep(0.3)


# ------------------------------------------------------------------------------ capacity (embedded)


@pytest.fixture(scope="module", params=["embedded"] if "embedded" in __import__("conftest").KINDS else [])
def cap_dep(request, launcher):
    d = launcher.deploy(request.param, ["--max-runs", "3", "--history-total-bytes", "256KiB"], n=1)
    yield d
    d.stop()


def test_max_runs_is_507_capacity(cap_dep):
    gw = cap_dep.a
    runs = [uid("cap") for _ in range(3)]
    for r in runs:
        publish_ok(gw, r, log("x"))
    resp = publish(gw, uid("cap"), log("one too many"))
    assert_error(resp, 507, "capacity")
    publish_ok(gw, runs[0], log("existing runs still take events"))


def test_history_total_bytes_is_507_capacity(cap_dep):
    gw = cap_dep.a
    # reuse an existing run (max-runs is 3 here): fill history with 40 KiB events
    runs = [s["run"] for s in __import__("harness").get_json(gw, "/v1/runs")["runs"]]
    run = runs[0]
    statuses = []
    for i in range(12):
        statuses.append(publish(gw, run, {"kind": "log", "data": {"pad": "x" * 40_000}}))
        if statuses[-1].status != 200:
            break
    last = statuses[-1]
    assert last.status == 507, f"no 507 after {len(statuses)} x 40 KiB into 256 KiB: {[r.status for r in statuses]}"
    assert_error(last, 507, "capacity")


def test_replay_never_fills_the_live_queue(slow_dep):
    """"Replay after `since` is written straight to the socket, page by page, so it never fills
    the queue": a replay far larger than --queue-messages 32 / --queue-bytes 64KiB, read slowly,
    arrives whole without a 4000 close."""
    gw = slow_dep.a
    run = uid("replay")
    seqs = []
    for _ in range(4):
        seqs += publish_ok(gw, run, [{"kind": "log", "data": {"pad": "r" * 1000}} for _ in range(250)])
    c = ws(gw, rcvbuf=4096)
    subscribe(c, run, since=0)
    time.sleep(1.0)  # let the server run into a full socket
    got = []
    while len(got) < len(seqs):
        m = c.recv(10)
        assert m.kind not in ("close", "eof"), f"closed {m.code} after {len(got)} of {len(seqs)} replayed events"
        if m.kind == "text":
            f = json.loads(m.text)
            if f["type"] == "event":
                got.append(f["seq"])
                if len(got) % 200 == 0:
                    time.sleep(0.05)
    c.close()
    assert got == seqs

"""Regression tests for defects an outside tester found: a cancelled async publish poisoning the
connection, answers cut short, malformed 200s, header/token injection, NATS payload limits and
unbounded connects, non-RuncastError exceptions for bad input, and a few smaller ones."""

from __future__ import annotations

import asyncio
import http.client
import importlib
import json
import socket
import threading
import time
from typing import Any, List, Optional

import pytest
from support import SECRET, Proxy, bounded, free_port, history, hs256_token, transport_params, uid

import runcast

TRANSPORTS = transport_params()
FAST = runcast.Backoff(0.01, 0.05)


# ------------------------------------------------------------------------------ helpers

class ScriptedHTTP:
    """A loopback HTTP server that answers the n-th connection's first request with the n-th
    raw response, then closes that connection. Records each request's head."""

    def __init__(self, *responses: bytes) -> None:
        self.responses = list(responses)
        self.heads: List[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        break
                    buf += d
                head, _, rest = buf.partition(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        n = int(v)
                while len(rest) < n:
                    d = c.recv(65536)
                    if not d:
                        break
                    rest += d
                self.heads.append(head.decode("latin-1"))
                if self.responses:
                    c.sendall(self.responses.pop(0))
                c.shutdown(socket.SHUT_WR)  # FIN
                c.settimeout(2)
                try:
                    c.recv(1)
                except OSError:
                    pass

    def header(self, i: int, name: str) -> Optional[str]:
        for line in self.heads[i].split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    def close(self) -> None:
        self.sock.close()


def ok200(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        ctype, len(body), body)


class FakeSSE:
    """An asyncio server answering each GET with the next raw response (then closing)."""

    def __init__(self, *responses: bytes) -> None:
        self.responses = list(responses)
        self.heads: List[bytes] = []
        self.url = ""
        self.server: Any = None

    async def __aenter__(self) -> "FakeSSE":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await r.readuntil(b"\r\n\r\n"))
            if self.responses:
                w.write(self.responses.pop(0))
                await w.drain()
            else:
                await asyncio.sleep(30)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


def sse(*frames: dict) -> bytes:
    body = b"".join(f"data: {json.dumps(f)}\n\n".encode() for f in frames)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body


STATE5 = {"type": "state", "run": "r1", "seq": 5, "state": {"run": "r1", "seq": 5,
                                                             "status": "running"}}


def ev(seq: int) -> dict:
    return {"type": "event", "run": "r1", "seq": seq, "kind": "log", "data": {"n": seq}, "ts": 1}


# ------------------------------------------------------------------------------ 1: cancellation

@pytest.mark.parametrize("how", ["wait_for", "cancel"])
def test_cancelled_async_publish_does_not_poison_later_calls(embedded, how):
    """A caller that gives up on a publish (wait_for timing out, task.cancel()) leaves an answer
    in flight; the connection must be dropped, or every later call reads the previous answer
    (wrong seqs, and a success reported for an event that is never stored)."""
    proxy = Proxy(embedded.port)
    run = uid("cancel")
    try:
        async def main() -> List[Any]:
            got = []
            async with runcast.AsyncPublisher(proxy.url, run, timeout=5) as p:
                got.append(("a0", await p.log("a0")))
                proxy.blackhole(True)   # the answer (and the request) hang in the proxy
                if how == "wait_for":
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(p.log("slow"), 0.3)
                else:
                    t = asyncio.ensure_future(p.log("slow"))
                    await asyncio.sleep(0.3)
                    t.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await t
                proxy.blackhole(False)  # the stale answer now comes back
                await asyncio.sleep(0.5)
                for i in range(3):
                    got.append((f"next-{i}", await asyncio.wait_for(p.log(f"next-{i}"), 5)))
            return got

        got = bounded(main(), 30)
        stored = {e["seq"]: e["data"]["line"] for e in history(embedded.url, run)}
        for line, seq in got:
            assert stored.get(seq) == line, (got, stored)
    finally:
        proxy.close()


def test_sync_exception_mid_request_drops_the_connection(embedded, monkeypatch):
    """Any exception between sending a request and reading its answer leaves the connection
    unusable; the next publish must not fail (or read the stale answer) because of it."""
    run = uid("midreq")
    with runcast.Publisher(embedded.url, run) as p:
        assert p.log("first") > 0
        real = http.client.HTTPResponse.read
        calls = {"n": 0}

        def boom(self: Any, *a: Any) -> bytes:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("interrupted")
            return real(self, *a)

        monkeypatch.setattr(http.client.HTTPResponse, "read", boom)
        with pytest.raises(RuntimeError):
            p.log("interrupted")
        monkeypatch.setattr(http.client.HTTPResponse, "read", real)
        s = p.log("after")
    stored = {e["seq"]: e["data"]["line"] for e in history(embedded.url, run)}
    assert stored[s] == "after"


# ------------------------------------------------------------------------------ 4, 5: answers

def test_sync_answer_cut_short_is_retried_with_the_same_key():
    body = b'{"run":"r1","seqs":[7]}'
    half = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body[:8])
    srv = ScriptedHTTP(half, ok200(body))
    try:
        with runcast.Publisher(srv.url, "r1", backoff=FAST, timeout=5) as p:
            assert p.log("x") == 7
        assert len(srv.heads) == 2
        assert srv.header(0, "Idempotency-Key") == srv.header(1, "Idempotency-Key")
    finally:
        srv.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_malformed_200_may_have_been_stored(mode):
    srv = ScriptedHTTP(ok200(b"<html>hi</html>", b"text/html"))
    try:
        with pytest.raises(runcast.ProtocolError) as e:
            if mode == "sync":
                with runcast.Publisher(srv.url, "r1", backoff=FAST, timeout=5) as p:
                    p.log("x")
            else:
                async def main() -> None:
                    async with runcast.AsyncPublisher(srv.url, "r1", backoff=FAST,
                                                      timeout=5) as ap:
                        await ap.log("x")
                bounded(main(), 10)
        assert e.value.maybe_stored is True
        assert e.value.idempotency_key == srv.header(0, "Idempotency-Key")
    finally:
        srv.close()


# ------------------------------------------------------------------------------ 6, 10: headers

BAD_TRACEPARENTS = ["a\r\nX-Injected: yes", "00-abc-def-01", "",
                    "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
                    "00-" + "a" * 32 + "-" + "b" * 16 + "-01\n"]


def test_bad_traceparent_is_refused_and_does_not_poison_the_connection(embedded):
    run = uid("tp")
    good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    with runcast.Publisher(embedded.url, run) as p:
        for tp in BAD_TRACEPARENTS:
            with pytest.raises(runcast.InvalidRequestError) as e:
                p.publish("log", {"line": "x"}, traceparent=tp)
            assert e.value.code == "invalid_traceparent"
            with pytest.raises(runcast.InvalidRequestError):
                p.publish_many([runcast.NewEvent("log", {}, traceparent=tp)])
        s = p.publish("log", {"line": "ok"}, traceparent=good)
    assert [e["seq"] for e in history(embedded.url, run)] == [s]

    async def main() -> None:
        async with runcast.AsyncPublisher(embedded.url, run) as ap:
            with pytest.raises(runcast.InvalidRequestError):
                await ap.publish("log", {}, traceparent="a\r\nb: c")
            await ap.log("after")

    bounded(main(), 10)


@pytest.mark.parametrize("name", ["Idempotency-Key", "content-length", "Content-Type",
                                  "Authorization", "Host", "traceparent", "Transfer-Encoding"])
def test_reserved_headers_are_refused(name):
    for cls in (runcast.Publisher, runcast.AsyncPublisher):
        with pytest.raises(runcast.InvalidRequestError) as e:
            cls("http://127.0.0.1:1", "r1", headers={name: "x"})
        assert e.value.code == "invalid_header"


@pytest.mark.parametrize("headers", [{"X-A": "1\r\nX-Injected: yes"}, {"X-A\r\n": "1"},
                                     {"X A": "1"}, {"X-A": 5}, {"X-A": "\x00"}])
def test_bad_header_names_and_values_are_refused(headers):
    with pytest.raises(runcast.InvalidRequestError):
        runcast.Publisher("http://127.0.0.1:1", "r1", headers=headers)


def test_custom_user_agent_replaces_the_default():
    srv = ScriptedHTTP(ok200(b'{"run":"r1","seqs":[1]}'))
    try:
        with runcast.Publisher(srv.url, "r1", headers={"User-Agent": "mine/1",
                                                       "X-Tenant": "t1"}) as p:
            p.log("x")
        assert srv.heads[0].lower().count("user-agent:") == 1
        assert srv.header(0, "User-Agent") == "mine/1" and srv.header(0, "X-Tenant") == "t1"
    finally:
        srv.close()


# ------------------------------------------------------------------------------ 7: tokens

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tokens_with_line_breaks_are_refused(transport):
    for bad in ("abc\r\nX-Injected: yes", "a b", "abc\n", "tök"):
        with pytest.raises(runcast.InvalidRequestError) as e:
            runcast.subscribe("http://127.0.0.1:1", "r1", token=bad, transport=transport)
        assert e.value.code == "invalid_token"

    async def main() -> None:
        with pytest.raises(runcast.InvalidRequestError) as e:
            async for _ in runcast.subscribe("http://127.0.0.1:1", "r1", transport=transport,
                                             get_token=lambda: "abc\r\nX-Injected: yes"):
                pass
        assert e.value.code == "invalid_token"

    bounded(main(), 10)
    with pytest.raises(runcast.InvalidRequestError):
        runcast.Publisher("http://127.0.0.1:1", "r1", key="k\r\nX-Injected: yes")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_get_token_exception_is_a_runcast_error(transport):
    def get_token() -> str:
        raise KeyError("vault down")

    async def main() -> None:
        with pytest.raises(runcast.UnauthorizedError) as e:
            async for _ in runcast.subscribe("http://127.0.0.1:1", "r1", get_token=get_token,
                                             transport=transport):
                pass
        assert e.value.code == "get_token_failed"
        assert isinstance(e.value.__cause__, KeyError)

    bounded(main(), 10)


def test_ws_failing_get_token_at_refresh_keeps_the_subscription(secure):
    """get_token failing at a `refresh` must not end the subscription: the old token is valid
    until its exp; the reconnect at exp asks get_token again."""
    pytest.importorskip("websockets")
    run = uid("ok")
    calls: List[float] = []

    def get_token() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return hs256_token(SECRET, int(time.time() + 6.5), [run])
        if len(calls) == 2:
            raise RuntimeError("the token service is down")
        return hs256_token(SECRET, int(time.time() + 600), [run])

    def publish_during(seconds: float) -> List[int]:
        seqs = []
        with runcast.Publisher(secure.gw.url, run, key=secure.key) as p:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                seqs.append(p.log("x"))
                time.sleep(0.1)
            seqs.append(p.complete())
        return seqs

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sub = runcast.subscribe(secure.gw.url, run, since=0, get_token=get_token,
                                transport="ws", until_finished=True, backoff=FAST)
        publishing = loop.run_in_executor(None, publish_during, 8.0)
        got = [i async for i in sub]
        seqs = await publishing
        assert [i.seq for i in got if isinstance(i, runcast.Event)] == seqs
        assert len(calls) >= 3 and sub.connects == 2, (len(calls), sub.connects)

    bounded(main(), 30)


# ------------------------------------------------------------------------------ 8, 12: frames

def test_event_before_state_is_a_protocol_error():
    async def main() -> None:
        async with FakeSSE(sse(ev(1))) as g:
            with pytest.raises(runcast.ProtocolError):
                async for _ in runcast.subscribe(g.url, "r1", max_attempts=1):
                    pass
        async with FakeSSE(sse({"type": "gap", "run": "r1", "from": 1, "to": 3})) as g:
            with pytest.raises(runcast.ProtocolError):
                async for _ in runcast.subscribe(g.url, "r1", max_attempts=1):
                    pass

    bounded(main(), 10)


def test_gap_overlapping_the_cursor_is_clipped():
    async def main() -> List[Any]:
        gap = {"type": "gap", "run": "r1", "from": 3, "to": 8, "message": "retention"}
        async with FakeSSE(sse(STATE5, gap, ev(9))) as g:
            items = []
            async for item in runcast.subscribe(g.url, "r1"):
                items.append(item)
                if len(items) == 3:
                    break
            return items

    items = bounded(main(), 10)
    assert isinstance(items[1], runcast.Gap)
    assert (items[1].from_, items[1].to) == (6, 8)
    assert isinstance(items[2], runcast.Event) and items[2].seq == 9


def test_subscribe_retry_after_is_capped(monkeypatch):
    sub_mod = importlib.import_module("runcast.subscribe")
    monkeypatch.setattr(sub_mod, "MAX_SUBSCRIBE_RETRY_AFTER", 0.2)
    r503 = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 100000\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n")

    async def main() -> Any:
        async with FakeSSE(r503, sse(STATE5)) as g:
            async for item in runcast.subscribe(g.url, "r1", backoff=FAST):
                return item

    t0 = time.monotonic()
    assert isinstance(bounded(main(), 10), runcast.State)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------ 11: bad input

def _deep(n: int) -> Any:
    v: Any = {}
    for _ in range(n):
        v = {"d": v}
    return v


def test_deep_data_is_refused_before_encoding():
    with runcast.Publisher("http://127.0.0.1:1", "r1") as p:
        for depth in (65, 2000, 100000):
            with pytest.raises(runcast.InvalidRequestError) as e:
                p.publish("log", _deep(depth))
            assert e.value.code == "data_too_deep"
        with pytest.raises(runcast.InvalidRequestError):
            p.publish_many([{"kind": "log", "data": [[[]]] * 2}, {"kind": "log",
                                                                  "data": _deep(3000)}])

        for not_a_batch in (None, 5, {"kind": "log", "data": 1}, "log"):
            with pytest.raises(runcast.InvalidRequestError):
                p.publish_many(not_a_batch)  # type: ignore[arg-type]

    async def main() -> None:
        async with runcast.AsyncPublisher("http://127.0.0.1:1", "r1") as ap:
            with pytest.raises(runcast.InvalidRequestError):
                await ap.publish("log", _deep(2000))

    bounded(main(), 10)


@pytest.mark.parametrize("url", ["http://exa mple.com", "http://host/a b", "http://ho\r\nst/",
                                 "http://host/\x00"])
def test_bad_urls_are_invalid_url(url):
    with pytest.raises(runcast.InvalidRequestError) as e:
        runcast.Publisher(url, "r1")
    assert e.value.code == "invalid_url"
    with pytest.raises(runcast.InvalidRequestError):
        runcast.subscribe(url, "r1")


@pytest.mark.parametrize("url", [None, 5, b"http://x", {"a": 1}])
def test_subscribe_url_of_the_wrong_type(url):
    with pytest.raises(runcast.InvalidRequestError) as e:
        runcast.subscribe(url, "r1")  # type: ignore[arg-type]
    assert e.value.code == "invalid_url"


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"max_attempts": 1.5},
                                    {"timeout": -1}, {"timeout": 0}, {"timeout": float("nan")},
                                    {"timeout": "5"}, {"max_retry_after": -1},
                                    {"backoff": (0.1, 1)}, {"ssl_context": "ca.pem"}])
def test_bad_publisher_options_are_invalid_option(kwargs):
    for cls in (runcast.Publisher, runcast.AsyncPublisher):
        with pytest.raises(runcast.InvalidRequestError) as e:
            cls("http://127.0.0.1:1", "r1", **kwargs)
        assert e.value.code == "invalid_option" and isinstance(e.value, ValueError)


@pytest.mark.parametrize("kwargs", [{"transport": "grpc"}, {"max_attempts": 0},
                                    {"connect_timeout": -1}, {"idle_timeout": 0},
                                    {"max_message_bytes": 0}, {"backoff": None},
                                    {"get_token": "not callable"}, {"ssl_context": 1}])
def test_bad_subscribe_options_are_invalid_option(kwargs):
    with pytest.raises(runcast.InvalidRequestError) as e:
        runcast.subscribe("http://127.0.0.1:1", "r1", **kwargs)
    assert e.value.code == "invalid_option"


@pytest.mark.parametrize("args", [(0, 1), (-1, 1), (1, 0.5), (float("inf"), float("inf")),
                                  (0.1, float("nan"))])
def test_backoff_is_validated(args):
    with pytest.raises(runcast.InvalidRequestError) as e:
        runcast.Backoff(*args)
    assert e.value.code == "invalid_option"


# ------------------------------------------------------------------------------ NATS (2, 3, 9)

def test_nats_event_over_max_payload_is_refused_without_killing_the_connection(nats_server,
                                                                                 nats_pair):
    nats = pytest.importorskip("nats")
    run = uid("big")

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            p = runcast.NatsPublisher(nc, run)
            limit = nc.max_payload
            msg_id = f"{run}/big-1"
            # As the server counts it: the header block as sent, plus the payload.
            head = len(f"NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\n"
                       f"Nats-Expected-Stream: RUNCAST_EVENTS\r\n\r\n")
            fits = limit - head - 2  # a JSON string's quotes
            with pytest.raises(runcast.InvalidRequestError) as e:
                await p.publish("log", "x" * (fits + 1), id="big-1")
            assert e.value.code == "too_large" and e.value.maybe_stored is False
            assert e.value.idempotency_key
            await asyncio.sleep(0.2)
            assert nc.is_connected, "the oversized event reached the server"
            # Exactly at the limit is still accepted, and the shared connection lives on.
            try:
                await p.publish("log", "x" * fits, id="big-1")
            except runcast.InvalidRequestError as e2:
                # The stream may cap messages below max_payload: JetStream refuses it, cleanly.
                assert e2.code == "too_large"
            assert nc.is_connected
            assert await p.log("after") > 0
        finally:
            await nc.close()

    bounded(main(), 20)


def test_nats_unreachable_is_bounded_by_timeout_and_attempts():
    pytest.importorskip("nats")
    url = f"nats://127.0.0.1:{free_port()}"

    async def main() -> None:
        p = runcast.NatsPublisher(url, "r1", timeout=0.5, max_attempts=2, backoff=FAST)
        t0 = time.monotonic()
        with pytest.raises(runcast.TransportError) as e:
            await p.log("x")
        assert time.monotonic() - t0 < 4
        assert e.value.maybe_stored is False and e.value.idempotency_key
        await p.close()

    bounded(main(), 20)


def test_nats_idempotency_key_matches_the_gateways_id(nats_server, nats_pair):
    """`idempotency_key=` on NATS gives the Nats-Msg-Id the gateway gives a one-event HTTP
    publish with that Idempotency-Key (`<run>/<key>`), so the two deduplicate each other."""
    nats = pytest.importorskip("nats")
    a, _ = nats_pair
    run = uid("natskey")

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            p = runcast.NatsPublisher(nc, run)
            s1 = await p.publish("log", {"line": "once"}, idempotency_key="k-1")
            s2 = await p.publish("log", {"line": "once"}, idempotency_key="k-1")
            async with runcast.AsyncPublisher(a.url, run) as hp:
                s3 = await hp.publish("log", {"line": "once"}, idempotency_key="k-1")
                s4 = await hp.publish("log", {"line": "other"}, idempotency_key="k-2")
            s5 = await p.publish("log", {"line": "other"}, idempotency_key="k-2")
            assert s1 == s2 == s3 and s4 == s5 and s4 != s1
            with pytest.raises(runcast.InvalidRequestError):
                await p.publish("log", {}, idempotency_key="bad key")
        finally:
            await nc.close()

    bounded(main(), 20)
    assert len(history(a.url, run)) == 2


def test_nats_bad_options_and_traceparent():
    pytest.importorskip("nats")
    for kw in ({"max_attempts": 0}, {"timeout": -1}, {"backoff": 1}, {"stream": "a b"}):
        with pytest.raises(runcast.InvalidRequestError) as e:
            runcast.NatsPublisher("nats://127.0.0.1:1", "r1", **kw)
        assert e.value.code == "invalid_option"

    async def main() -> None:
        p = runcast.NatsPublisher("nats://127.0.0.1:1", "r1")
        with pytest.raises(runcast.InvalidRequestError) as e:
            await p.publish("log", {}, traceparent="a\r\nb")
        assert e.value.code == "invalid_traceparent"

    bounded(main(), 10)

"""What the client does with input a real gateway would not send (a fake server on a loopback
port), and unit checks of the parser and helpers. Malformed input must raise, never be skipped
silently, and never make the client buffer without bound."""

from __future__ import annotations

import asyncio
import json
import random
from typing import List, Optional, Tuple

import pytest
from support import bounded

import runcast
from runcast import _common, _errors, _sse

# ------------------------------------------------------------------------------ fake gateway


class FakeGateway:
    """Answers each GET with the next scripted response (raw bytes, written as given)."""

    def __init__(self, responses: List[bytes]) -> None:
        self.responses = list(responses)
        self.requests: List[str] = []
        self.server: Optional[asyncio.base_events.Server] = None
        self.url = ""

    async def __aenter__(self) -> "FakeGateway":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            self.requests.append(head.split(b"\r\n")[0].decode())
            if self.responses:
                w.write(self.responses.pop(0))
                await w.drain()
            else:
                await asyncio.sleep(30)  # out of script: hang (the test's timeout catches it)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


def sse_response(body: bytes, ctype: str = "text/event-stream") -> bytes:
    # Close-delimited body: the simplest framing, and one the client must accept too.
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nConnection: close\r\n\r\n").encode() \
        + body


def chunked_sse(*chunks: bytes) -> bytes:
    out = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")
    for c in chunks:
        out += f"{len(c):x}\r\n".encode() + c + b"\r\n"
    return out + b"0\r\n\r\n"


def frame(obj: dict, id_: Optional[int] = None) -> bytes:
    idl = f"id: {id_}\n" if id_ is not None else ""
    return f"{idl}data: {json.dumps(obj)}\n\n".encode()


STATE5 = frame({"type": "state", "run": "r1", "seq": 5, "state": {"run": "r1", "seq": 5,
                                                                  "status": "running"}}, 5)


def ev(seq: int, run: str = "r1", **over: object) -> bytes:
    f = {"type": "event", "run": run, "seq": seq, "kind": "log", "data": {"n": seq}, "ts": 1}
    f.update(over)
    return frame(f, seq)


async def take(url: str, n: int, **kw: object) -> Tuple[List, runcast.Subscription]:
    sub = runcast.subscribe(url, "r1", backoff=runcast.Backoff(0.01, 0.02), **kw)  # type: ignore
    items: List = []
    async with sub:
        async for item in sub:
            items.append(item)
            if len(items) == n:
                break
    return items, sub


@pytest.mark.parametrize("body,what", [
    (STATE5 + b"data: {not json}\n\n", "not JSON"),
    (STATE5 + b"data: [1,2]\n\n", "object"),
    (STATE5 + frame({"type": "event", "run": "r1", "kind": "log", "data": 1, "ts": 1}), "seq"),
    (STATE5 + frame({"type": "event", "run": "r1", "seq": True, "kind": "log", "data": 1,
                     "ts": 1}), "seq"),
    (STATE5 + frame({"type": "event", "run": "r1", "seq": 6, "kind": "log", "ts": 1}), "data"),
    (STATE5 + ev(6, run="r2"), "for run 'r2'"),
    (STATE5 + frame({"type": "gap", "run": "r1", "from": 9, "to": 7, "message": ""}), "from > to"),
    (STATE5 + frame({"type": "error", "code": "invalid_since", "message": "no"}), "invalid_since"),
    (STATE5 + b"data: \xff\xfe\n\n", "UTF-8"),
    (frame({"type": "state", "run": "r1", "seq": 1, "state": [1]}), "not an object"),
])
def test_malformed_frames_raise(body, what):
    async def main() -> None:
        async with FakeGateway([sse_response(body)]) as fake:
            with pytest.raises(runcast.RuncastError) as e:
                await take(fake.url, 10)
            assert what.lower() in str(e.value).lower(), str(e.value)

    bounded(main(), 10)


def test_oversized_line_raises_without_buffering_it_all():
    async def main() -> None:
        big = STATE5 + b"data: " + b"x" * (3 * 1024 * 1024)  # no line end: must not be kept
        async with FakeGateway([sse_response(big)]) as fake:
            with pytest.raises(runcast.ProtocolError) as e:
                await take(fake.url, 10, max_message_bytes=64 * 1024)
            assert "over" in str(e.value)

    bounded(main(), 10)


def test_wrong_content_type_and_bad_chunking_raise():
    async def main() -> None:
        async with FakeGateway([sse_response(b"<html>", "text/html")]) as fake:
            with pytest.raises(runcast.ProtocolError, match="text/event-stream"):
                await take(fake.url, 1)
        bad = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
        async with FakeGateway([bad]) as fake:
            with pytest.raises(runcast.ProtocolError, match="chunk"):
                await take(fake.url, 1)

    bounded(main(), 10)


def test_http_error_before_the_stream_raises_with_its_code():
    body = b'{"error":{"code":"since_out_of_range","message":"since 9 is past the last seq 5"}}'
    resp = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def main() -> None:
        async with FakeGateway([resp]) as fake:
            with pytest.raises(runcast.InvalidRequestError) as e:
                await take(fake.url, 1, since=9)
            assert e.value.code == "since_out_of_range" and e.value.status == 400
            assert fake.requests == ["GET /v1/runs/r1/stream?since=9 HTTP/1.1"]

    bounded(main(), 10)


def test_resume_query_duplicates_and_stale_gaps():
    """Stream 1 ends after event 6 (split across chunks, CRLF line ends); a 503 with
    Retry-After comes next; stream 2 (the resume) replays 6 again, a gap wholly below the
    cursor, then 7: the client asks with since=6 and yields 7 once."""
    s1 = chunked_sse(STATE5[:7], STATE5[7:], ev(6).replace(b"\n", b"\r\n")[:20],
                     ev(6).replace(b"\n", b"\r\n")[20:])
    busy = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n")
    s2 = sse_response(STATE5 + ev(6) + frame({"type": "gap", "run": "r1", "from": 1, "to": 4,
                                              "message": "old"}) + b": heartbeat\n\n" + ev(7))

    async def main() -> None:
        async with FakeGateway([s1, busy, s2]) as fake:
            items, sub = await take(fake.url, 3)
            assert [type(i).__name__ for i in items] == ["State", "Event", "Event"]
            assert [i.seq for i in items] == [5, 6, 7]
            assert sub.duplicates_dropped == 1 and sub.cursor == 7
            assert fake.requests == ["GET /v1/runs/r1/stream HTTP/1.1",
                                     "GET /v1/runs/r1/stream?since=6 HTTP/1.1",
                                     "GET /v1/runs/r1/stream?since=6 HTTP/1.1"]

    bounded(main(), 10)


def test_max_attempts_bounds_a_subscription_that_cannot_connect():
    resp = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        async with FakeGateway([resp] * 3) as fake:
            with pytest.raises(runcast.TransportError, match="3 failed"):
                await take(fake.url, 1, max_attempts=3)

    bounded(main(), 10)


# ------------------------------------------------------------------------------ units


def test_sse_parser_line_ends_bom_and_multiline_data():
    p = _sse.SSEParser(1000, 1000)
    stream = b"\xef\xbb\xbfretry: 2000\r\n\r\nid: 1\rdata: {\"a\":\r\ndata:  1}\n\n: c\n\ndata\n\n"
    msgs: List[_sse.Message] = []
    for i in range(len(stream)):  # one byte at a time: every split point
        msgs += p.feed(stream[i:i + 1])
    assert [(m.data, m.id) for m in msgs] == [('{"a":\n 1}', "1"), ("", "1")]
    assert p.retry_ms == 2000


def test_sse_parser_bounds():
    with pytest.raises(runcast.ProtocolError):
        _sse.SSEParser(10, 1000).feed(b"data: " + b"x" * 20)
    p = _sse.SSEParser(100, 30)
    with pytest.raises(runcast.ProtocolError):
        p.feed(b"data: " + b"x" * 20 + b"\ndata: " + b"y" * 20 + b"\n")


def test_backoff_is_full_jitter_and_capped():
    b = runcast.Backoff(0.1, 5.0)
    rng = random.Random(1)
    for attempt in range(12):
        hi = min(5.0, 0.1 * 2 ** attempt)
        ds = [b.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= hi for d in ds)
        assert max(ds) > hi * 0.8  # spread over the whole window, not clustered
    assert b.delay(10 ** 6, rng) <= 5.0


def test_retry_after_forms():
    assert _common.retry_after_seconds({"retry-after": "7"}) == 7.0
    d = _common.retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
                                    now=1445412470.0)
    assert d == pytest.approx(10.0)
    assert _common.retry_after_seconds({"retry-after": "soon"}) is None
    assert _common.retry_after_seconds({}) is None


def test_urls():
    o = _common.parse_origin("https://progress.example.com/runcast/")
    assert (o.host, o.port, o.base_path, o.tls) == ("progress.example.com", 443, "/runcast", True)
    assert _common.parse_origin("ws://127.0.0.1:8080/v1").base_path == ""
    assert _common.parse_origin("http://[::1]:9/").host_header == "[::1]:9"
    for bad in ("ftp://x", "127.0.0.1:8080", "http://x/?q=1"):
        with pytest.raises(runcast.InvalidRequestError):
            _common.parse_origin(bad)


def test_error_mapping():
    e = _errors.error_from_response(429, b'{"error":{"code":"rate_limited","message":"slow"}}', 3)
    assert isinstance(e, runcast.RateLimitedError) and e.retry_after == 3 and e.message == "slow"
    e = _errors.error_from_response(507, b'{"error":{"code":"capacity","message":"full"}}')
    assert isinstance(e, runcast.CapacityError) and isinstance(e, runcast.ServerError)
    e = _errors.error_from_response(502, b"<html>bad gateway</html>")
    assert isinstance(e, runcast.ServerError) and e.code == "http_502"
    assert "bad gateway" in e.message
    e = _errors.error_from_response(400, b'{"error":{"code":"invalid_kind","message":"k"}}')
    assert isinstance(e, runcast.InvalidRequestError) and isinstance(e, ValueError)
    assert str(e) == "HTTP 400 invalid_kind: k"


def test_depth_check_is_iterative():
    deep: object = 0
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    assert _common.json_depth_ok(deep) is False
    assert _common.json_depth_ok({"a": [[{"b": 1}]]}) is True

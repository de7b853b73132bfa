"""Safe retries (a response lost on the way back, 503/429 with Retry-After) and errors that must
surface as exceptions without retrying (4xx)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from support import Proxy, bounded, canned_response, free_port, history, start_embedded, uid

import runcast

FAST = runcast.Backoff(0.05, 0.2)


@pytest.fixture
def proxy(embedded):
    p = Proxy(embedded.port)
    yield p
    p.close()


def test_sync_retry_after_dropped_response_is_stored_once(embedded, proxy):
    run = uid("drop")
    with runcast.Publisher(proxy.url, run, backoff=FAST) as p:
        first = p.log("before")
        proxy.drop_responses(1)
        seq = p.progress(1, 2)  # the gateway stores it; the answer is dropped; the retry ...
        last = p.log("after")
    evs = history(embedded.url, run)
    # ... gets the first copy's seq back, and history holds exactly one copy.
    assert [e["seq"] for e in evs] == [first, seq, last]
    assert [e["kind"] for e in evs] == ["log", "progress", "log"]
    assert proxy.requests >= 4, "the dropped request was not retried"


def test_async_retry_after_dropped_response_is_stored_once(embedded, proxy):
    run = uid("adrop")

    async def main() -> list:
        async with runcast.AsyncPublisher(proxy.url, run, backoff=FAST) as p:
            proxy.drop_responses(2)  # the first attempt and its first retry both lose the answer
            a = await p.status("x")
            b = await p.publish_many([{"kind": "log", "data": {"line": "1"}},
                                      {"kind": "log", "data": {"line": "2"}}])
            return [a, *b]

    seqs = bounded(main(), 20)
    evs = history(embedded.url, run)
    assert [e["seq"] for e in evs] == seqs
    assert [e["data"] for e in evs] == [{"state": "x"}, {"line": "1"}, {"line": "2"}]


def test_503_and_429_are_retried_honouring_retry_after(embedded, proxy):
    run = uid("busy")
    proxy.canned(canned_response(503, "unavailable", [("Retry-After", "1")]),
                 canned_response(429, "rate_limited", [("Retry-After", "1")]))
    t0 = time.monotonic()
    with runcast.Publisher(proxy.url, run, backoff=FAST) as p:
        seq = p.log("eventually")
    took = time.monotonic() - t0
    assert took >= 1.9, f"Retry-After not honoured: {took:.2f}s"
    assert [e["seq"] for e in history(embedded.url, run)] == [seq]


def test_async_503_is_retried(embedded, proxy):
    run = uid("abusy")
    proxy.canned(canned_response(503, "draining"), canned_response(500, "internal"))

    async def main() -> int:
        async with runcast.AsyncPublisher(proxy.url, run, backoff=FAST) as p:
            return await p.log("ok")

    seq = bounded(main(), 20)
    assert [e["seq"] for e in history(embedded.url, run)] == [seq]


def test_retries_are_bounded(embedded, proxy):
    proxy.canned(*[canned_response(503, "unavailable") for _ in range(3)])
    p = runcast.Publisher(proxy.url, uid("bound"), max_attempts=3, backoff=FAST)
    with pytest.raises(runcast.UnavailableError) as e:
        p.log("never")
    assert e.value.code == "unavailable" and e.value.status == 503
    assert proxy.requests == 3


def test_retry_after_longer_than_the_cap_is_reported(embedded, proxy):
    proxy.canned(canned_response(429, "rate_limited", [("Retry-After", "120")]))
    p = runcast.Publisher(proxy.url, uid("cap"), max_retry_after=5)
    t0 = time.monotonic()
    with pytest.raises(runcast.RateLimitedError) as e:
        p.log("x")
    assert time.monotonic() - t0 < 2 and e.value.retry_after == 120


def test_unreachable_gateway_is_a_transport_error():
    port = free_port()  # nothing listens there
    p = runcast.Publisher(f"http://127.0.0.1:{port}", uid("gone"), max_attempts=3, backoff=FAST)
    with pytest.raises(runcast.TransportError) as e:
        p.log("x")
    assert e.value.maybe_stored is False and e.value.idempotency_key

    async def main() -> None:
        async with runcast.AsyncPublisher(f"http://127.0.0.1:{port}", uid("gone"),
                                          max_attempts=2, backoff=FAST) as ap:
            await ap.log("x")

    with pytest.raises(runcast.TransportError):
        bounded(main(), 10)


def test_lost_answers_on_every_attempt_say_maybe_stored(embedded, proxy):
    run = uid("lost")
    proxy.drop_responses(3)
    p = runcast.Publisher(proxy.url, run, max_attempts=3, backoff=FAST)
    with pytest.raises(runcast.TransportError) as e:
        p.log("x")
    assert e.value.maybe_stored is True
    # What the error tells the caller to do: publish again with the same key. Stored once.
    seq = p.publish("log", {"line": "x"}, idempotency_key=e.value.idempotency_key)
    assert [ev["seq"] for ev in history(embedded.url, run)] == [seq]


# ------------------------------------------------------------------------------ 4xx


def test_4xx_errors_are_raised_with_their_code_and_not_retried(embedded, proxy):
    p = runcast.Publisher(proxy.url, uid("bad"), backoff=FAST)
    deep: object = 1
    for _ in range(70):
        deep = [deep]
    before = proxy.requests
    # Too deep is refused before sending (the gateway's rule, checked by the client too).
    with pytest.raises(runcast.InvalidRequestError) as e:
        p.publish("log", deep)
    assert e.value.code == "data_too_deep" and e.value.status is None and e.value.message
    assert proxy.requests == before
    with pytest.raises(runcast.InvalidRequestError) as e:
        p.publish_many([{"kind": "log", "data": i} for i in range(1001)])  # --max-batch 1000
    assert e.value.code == "too_many_events" and e.value.status == 413 and e.value.message
    with pytest.raises(runcast.InvalidRequestError) as e:
        p.publish("log", {"blob": "x" * (1024 * 1024 + 10)})
    assert e.value.code == "too_large" and e.value.status == 413
    assert proxy.requests - before == 2, "a 4xx was retried"
    p.close()


def test_wrong_base_url_is_not_found(embedded):
    p = runcast.Publisher(embedded.url + "/nope", uid("nf"))
    with pytest.raises(runcast.NotFoundError) as e:
        p.log("x")
    assert e.value.code == "not_found"


def test_publish_key_errors(secure):
    run = uid("ok")  # the key covers the prefix "ok-"
    with runcast.Publisher(secure.gw.url, run, key=secure.key) as p:
        assert p.log("allowed") >= 1
    with pytest.raises(runcast.UnauthorizedError) as e:
        runcast.Publisher(secure.gw.url, run).log("no key")
    assert e.value.code == "unauthorized" and e.value.status == 401
    with pytest.raises(runcast.UnauthorizedError):
        runcast.Publisher(secure.gw.url, run, key="wrong-key").log("bad key")
    with pytest.raises(runcast.ForbiddenError) as e:
        runcast.Publisher(secure.gw.url, uid("other"), key=secure.key).log("outside")
    assert e.value.code == "forbidden" and e.value.status == 403

    async def main() -> None:
        async with runcast.AsyncPublisher(secure.gw.url, uid("other"), key=secure.key) as ap:
            await ap.log("outside")

    with pytest.raises(runcast.ForbiddenError):
        bounded(main(), 10)


def test_error_bodies_without_json_still_raise_clearly(embedded, proxy):
    proxy.canned(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\n\r\n")
    with pytest.raises(runcast.InvalidRequestError) as e:
        runcast.Publisher(proxy.url, uid("raw")).log("x")
    assert e.value.code == "http_431" and e.value.status == 431


def test_garbage_answer_is_a_protocol_error(embedded, proxy):
    proxy.canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
                 b"Connection: close\r\n\r\n{\"seqs\":[]}")
    with pytest.raises(runcast.ProtocolError):
        runcast.Publisher(proxy.url, uid("garbage")).log("x")
    proxy.canned(b"SMTP ready\r\n\r\n")

    async def main() -> None:
        async with runcast.AsyncPublisher(proxy.url, uid("garbage")) as ap:
            await ap.log("x")

    with pytest.raises(runcast.ProtocolError):
        bounded(main(), 10)


def test_error_json_shape(embedded):
    # The exception's fields come from the gateway's body, not from guesses.
    with pytest.raises(runcast.InvalidRequestError) as e:
        deep = json.loads("[" * 65 + "]" * 65)
        runcast.Publisher(embedded.url, uid("shape")).publish("log", deep)
    assert "64" in e.value.message


def test_keepalive_closed_by_the_gateway_costs_no_attempt(procs, workdir):
    """The gateway closes idle keep-alive connections after --header-read-timeout; the next
    publish finds its connection dead. With max_attempts=1 it still succeeds: the stale
    connection is replaced once, with the same key, without spending an attempt."""
    gw = start_embedded(procs, workdir, "--header-read-timeout", "1s", name="idle")
    run = uid("stale")
    p = runcast.Publisher(gw.url, run, max_attempts=1)

    async def main() -> list:
        async with runcast.AsyncPublisher(gw.url, run, max_attempts=1) as ap:
            a = await ap.log("async 1")
            await asyncio.sleep(2.5)  # one to two periods: closed by now
            return [a, await ap.log("async 2")]

    s1 = p.log("sync 1")
    time.sleep(2.5)
    s2 = p.log("sync 2")
    p.close()
    seqs = [s1, s2] + bounded(main(), 15)
    assert [e["seq"] for e in history(gw.url, run)] == seqs

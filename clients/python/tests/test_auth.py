"""Subscriber tokens: a bad token raises UnauthorizedError at once (no reconnect loop), a token
that does not cover the run raises ForbiddenError, and expiring tokens are renewed through
`get_token` without losing or repeating an event (SSE: reconnect at exp; WebSocket: in-band
refresh)."""

from __future__ import annotations

import asyncio
import time
from typing import List

import pytest
from support import SECRET, Proxy, bounded, hs256_token, transport_params, uid

import runcast

TRANSPORTS = transport_params()


def token(runs=(), prefixes=(), lifetime: float = 600) -> str:
    return hs256_token(SECRET, int(time.time() + lifetime), runs, prefixes)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_token_raises_unauthorized_without_a_loop(secure, transport):
    proxy = Proxy(secure.gw.port)
    try:
        async def main() -> None:
            for bad in ("not-a-jwt", hs256_token("another-secret-0123456789abcdefghijkl",
                                                 int(time.time()) + 60, run_prefixes=[""])):
                t0 = time.monotonic()
                with pytest.raises(runcast.UnauthorizedError) as e:
                    async for _ in runcast.subscribe(proxy.url, uid("ok"), token=bad,
                                                     transport=transport):
                        pass
                assert e.value.code == "unauthorized" and e.value.status == 401
                assert time.monotonic() - t0 < 2
            with pytest.raises(runcast.UnauthorizedError):
                async for _ in runcast.subscribe(proxy.url, uid("ok"), transport=transport):
                    pass  # no token at all

        bounded(main(), 20)
        assert proxy.connections == 3, f"{proxy.connections} connections for 3 refusals"
    finally:
        proxy.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_not_covering_the_run_is_forbidden(secure, transport):
    async def main() -> None:
        with pytest.raises(runcast.ForbiddenError) as e:
            async for _ in runcast.subscribe(secure.gw.url, "ok-not-mine",
                                             token=token(runs=["ok-mine"]), transport=transport):
                pass
        assert e.value.code == "forbidden"

    bounded(main(), 10)


def _publish_during(secure, run: str, seconds: float, every: float) -> List[int]:
    """Publishes log lines for `seconds` (in a thread), then a complete event."""
    seqs: List[int] = []
    with runcast.Publisher(secure.gw.url, run, key=secure.key) as p:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            seqs.append(p.log(f"line {i}"))
            i += 1
            time.sleep(every)
        seqs.append(p.complete())
    return seqs


def test_sse_token_expiry_is_renewed_with_get_token(secure):
    run = uid("ok")
    calls: List[float] = []

    async def get_token() -> str:  # async on purpose: both kinds are accepted
        calls.append(time.monotonic())
        return token(runs=[run], lifetime=2.5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sub = runcast.subscribe(secure.gw.url, run, since=0, get_token=get_token,
                                until_finished=True, backoff=runcast.Backoff(0.05, 0.5))
        publishing = loop.run_in_executor(None, _publish_during, secure, run, 5.0, 0.05)
        got = [i async for i in sub]
        seqs = await publishing
        events = [i.seq for i in got if isinstance(i, runcast.Event)]
        assert events == seqs, "lost or repeated events across token renewals"
        # Each token lives at most 2.5 s and the SSE stream ends at exp: over 5 s there were
        # reconnects, each with a fresh token.
        assert sub.connects >= 2 and len(calls) >= sub.connects, (sub.connects, len(calls))

    bounded(main(), 30)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_static_token_expiry_raises_unauthorized(secure, transport):
    """Without get_token there is no fresher token: at exp (SSE: the stream ends; WebSocket:
    close 4003) the subscription raises instead of reconnecting with the dead token."""
    run = uid("ok")

    async def main() -> None:
        async with runcast.AsyncPublisher(secure.gw.url, run, key=secure.key) as p:
            s = await p.log("x")
        sub = runcast.subscribe(secure.gw.url, run, since=0, token=token(runs=[run], lifetime=1.5),
                                transport=transport)
        got = []
        t0 = time.monotonic()
        with pytest.raises(runcast.UnauthorizedError):
            async for item in sub:
                got.append(item)
        assert [i.seq for i in got if isinstance(i, runcast.Event)] == [s]
        assert time.monotonic() - t0 < 4

    bounded(main(), 15)


def test_ws_refresh_keeps_the_connection(secure):
    """The gateway sends `refresh` 5 s before exp; get_token answers it in an `auth` frame and
    the connection outlives the first token."""
    pytest.importorskip("websockets")
    run = uid("ok")
    calls: List[float] = []

    def get_token() -> str:  # sync on purpose
        calls.append(time.monotonic())
        return token(runs=[run], lifetime=6.5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sub = runcast.subscribe(secure.gw.url, run, since=0, get_token=get_token,
                                transport="ws", until_finished=True)
        publishing = loop.run_in_executor(None, _publish_during, secure, run, 7.5, 0.1)
        got = [i async for i in sub]
        seqs = await publishing
        assert [i.seq for i in got if isinstance(i, runcast.Event)] == seqs
        assert sub.connects == 1, "the refresh should have kept the first connection"
        assert len(calls) >= 2, "get_token was not asked for the refresh"

    bounded(main(), 30)

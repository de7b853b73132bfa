"""Following a run: `async for item in runcast.subscribe(url, run): ...`.

The subscription implements docs/protocol.md, "Writing a client that loses nothing":

1. it keeps a cursor: the seq of the last event it yielded, or the `to` of the last gap (after a
   fresh subscribe, the state's seq; after `since=N`, N);
2. it drops any event with seq <= cursor (a reconnect race can replay one);
3. after any drop (a dead gateway, a reset, a stream the gateway ended, an idle timeout) it
   reconnects with exponential backoff and full jitter (100 ms doubling to 5 s by default) and
   resumes with `since=cursor`, on the next URL of the list if several gateways were given;
4. it yields `gap` frames as `Gap` items: events that retention dropped are announced, never
   silently skipped.

Final answers end the subscription with an exception instead of a reconnect loop: 401
(`UnauthorizedError`), 403 (`ForbiddenError`), any other 4xx, and malformed data
(`ProtocolError`).

Transports: Server-Sent Events (`GET /v1/runs/<run>/stream`) on the standard library is the
default, so the package needs no dependency. `transport="ws"` uses the WebSocket API through the
optional `websockets` package (`pip install runcast[ws]`), which also renews tokens in-band
(`refresh`/`auth` frames) instead of reconnecting at the token's expiry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import ssl
import time
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Union,
)

from . import _asynchttp
from ._common import (
    MAX_SUBSCRIBE_RETRY_AFTER,
    SUBSCRIBE_BACKOFF,
    Backoff,
    Origin,
    check_backoff,
    check_count,
    check_number,
    check_run,
    check_ssl_context,
    check_token,
    parse_origin,
    retry_after_seconds,
)
from ._errors import (
    APIError,
    InvalidRequestError,
    ProtocolError,
    RuncastError,
    TransportError,
    UnauthorizedError,
    error_from_frame,
    error_from_response,
)
from ._sse import SSEParser
from ._types import Event, Gap, Item, State

__all__ = ["subscribe", "Subscription", "TokenSource"]

log = logging.getLogger("runcast")

TokenSource = Callable[[], Union[str, None, Awaitable[Optional[str]]]]

#: An SSE line (one `data:` line holds a whole event frame unless its JSON has line breaks) may
#: be as long as the largest event: --max-publish is 1 MiB by default, and a JSON frame adds its
#: envelope. 2 MiB + 64 KiB leaves room for a gateway configured up to 2 MiB.
DEFAULT_MAX_MESSAGE = 2 * 1024 * 1024 + 64 * 1024

# Error codes a gateway may put in a stream's error frame that mean "try again" rather than
# "this cannot work" (the same split as the HTTP statuses 429/503/5xx).
_RESUMABLE_CODES = {"unavailable", "draining", "internal", "capacity", "rate_limited"}


class _Resume(Exception):
    """Internal: this connection is over; reconnect and resume (optionally after `delay`)."""

    def __init__(self, reason: str, delay: Optional[float] = None,
                 token_expired: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.token_expired = token_expired


class Subscription:
    """An async iterator of `State`, then `Event` and `Gap` items for one run.

    Use it with ``async for``; ``break`` out or call :meth:`aclose` (or use ``async with``) to
    close the connection. Attributes for monitoring:

    - ``cursor``: the seq the subscription would resume from (None before the first state);
    - ``connects``: connections that got as far as the state frame (1 + reconnects);
    - ``url``: the gateway of the current (or last) connection;
    - ``connected_at``: ``time.monotonic()`` when the current connection's state frame came in;
    - ``duplicates_dropped``: events skipped because their seq was at or below the cursor.
    """

    def __init__(self, urls: Sequence[str], run: str, since: Optional[int],
                 token: Optional[str], get_token: Optional[TokenSource], *, transport: str,
                 until_finished: bool, ssl_context: Optional[ssl.SSLContext],
                 connect_timeout: float, idle_timeout: float, backoff: Backoff,
                 max_attempts: Optional[int], max_message_bytes: int) -> None:
        if not urls:
            raise InvalidRequestError("invalid_url", "at least one gateway URL is needed")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool)
                                  or since < 0):
            raise InvalidRequestError("invalid_since", f"since must be an integer >= 0: {since!r}")
        if transport not in ("sse", "ws"):
            raise InvalidRequestError("invalid_option",
                                      f"transport must be 'sse' or 'ws', not {transport!r:.80}")
        connect_timeout = check_number(connect_timeout, "connect_timeout")
        idle_timeout = check_number(idle_timeout, "idle_timeout")
        check_backoff(backoff)
        check_ssl_context(ssl_context)
        if max_attempts is not None:
            check_count(max_attempts, "max_attempts")
        check_count(max_message_bytes, "max_message_bytes")
        if token:  # "" means no token, as None does
            check_token(token)
        if get_token is not None and not callable(get_token):
            raise InvalidRequestError("invalid_option", "get_token must be callable")
        self.origins: List[Origin] = [parse_origin(u) for u in urls]
        self.run = check_run(run)
        self.since = since
        self.transport = transport
        self.until_finished = until_finished
        self.cursor: Optional[int] = since
        self.connects = 0
        self.url: Optional[str] = None
        self.connected_at: Optional[float] = None
        self.duplicates_dropped = 0
        self._token = token
        self._get_token = get_token
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._backoff = backoff
        self._max_attempts = max_attempts
        self._max_message = max_message_bytes
        self._gen: Optional[AsyncIterator[Item]] = None
        self._finished_seq: Optional[int] = None
        self._expired_token: Optional[str] = None

    # ------------------------------------------------------------------ iterator protocol

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Item:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> "Subscription":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the loop

    async def _token_for(self, first: bool) -> Optional[str]:
        if self._get_token is None or (first and self._token is not None):
            return self._token
        try:
            t = self._get_token()
            if inspect.isawaitable(t):
                t = await t
        except RuncastError:
            raise
        except Exception as e:
            raise UnauthorizedError("get_token_failed", f"get_token raised {e!r}") from e
        if t is not None and not isinstance(t, str):
            raise InvalidRequestError("invalid_token", "get_token must return a str or None")
        # Checked like `token=`: it goes into an Authorization header, where CR/LF would inject
        # headers of its own.
        return check_token(t, "the token from get_token") if t else None

    async def _refresh_token(self, first: bool = False) -> Optional[str]:
        """A token for an in-band `auth` frame: only get_token can give a fresher one."""
        return await self._token_for(first) if self._get_token is not None else None

    async def _run(self) -> AsyncIterator[Item]:
        failures = 0          # consecutive attempts that failed or lasted under a second
        index = 0             # which URL to try next
        state_yielded = False
        while True:
            origin = self.origins[index % len(self.origins)]
            self.url = origin.url("")
            conn: Optional[_Conn] = None
            delay: Optional[float] = None
            healthy = False
            started: Optional[float] = None
            token: Optional[str] = None
            try:
                token = await self._token_for(self.connects == 0 and failures == 0)
                if token is not None and token == self._expired_token:
                    # The gateway accepts a token for a few seconds past its exp (clock-skew
                    # leeway) but ends the stream at exp at once: reconnecting with it would
                    # spin until the leeway runs out. It is known dead, so stop here.
                    raise UnauthorizedError(
                        "unauthorized", "the token expired and no fresh one is available "
                        "(pass get_token to renew it)", None)
                conn = await self._open(origin, token)
                async for frame in conn.frames():
                    ftype = frame["type"]
                    if ftype == "state":
                        st = State.from_frame(frame)
                        self._check_run(st.run, frame)
                        healthy = True
                        self.connects += 1
                        started = self.connected_at = time.monotonic()
                        if self.cursor is None:
                            # Fresh subscribe: the events up to the state's seq are in the state.
                            self.cursor = st.seq
                        if st.finished:
                            self._finished_seq = st.seq
                        if not state_yielded:
                            # Only the first state is yielded: after a resume the state is the
                            # run's head, ahead of the events still being replayed, and would
                            # read as progress going backwards.
                            state_yielded = True
                            yield st
                        if self._done():
                            return
                    elif ftype == "event":
                        ev = Event.from_frame(frame)
                        self._check_run(ev.run, frame)
                        if self.cursor is None:
                            raise ProtocolError(f"event frame before the state frame: "
                                                f"{frame!r:.300}")
                        if ev.seq <= self.cursor:
                            self.duplicates_dropped += 1
                            continue
                        self.cursor = ev.seq
                        yield ev
                        if self.until_finished and ev.kind in ("complete", "error"):
                            return
                        if self._done():
                            return
                    elif ftype == "gap":
                        gap = Gap.from_frame(frame)
                        self._check_run(gap.run, frame)
                        if self.cursor is None:
                            raise ProtocolError(f"gap frame before the state frame: "
                                                f"{frame!r:.300}")
                        if gap.to <= self.cursor:
                            continue  # wholly at or below the cursor: nothing new is announced
                        if gap.from_ <= self.cursor:
                            # Partly below: what is at or below the cursor was delivered (or
                            # announced) already; announce only the part after it.
                            gap = dataclasses.replace(gap, from_=self.cursor + 1)
                        self.cursor = gap.to
                        yield gap
                        if self._done():
                            return
                    elif ftype == "error":
                        err = error_from_frame(frame)
                        if err.code in _RESUMABLE_CODES:
                            raise _Resume(f"error frame {err.code}: {err.message}")
                        if err.code == "unauthorized" and healthy:
                            # On a stream that was authorized, this is the token running out:
                            # the gateway sends it on SSE at `exp` just before ending the
                            # stream. Reconnect (with a fresh token from get_token); if there
                            # is none, the reconnect's 401 ends the subscription.
                            raise _Resume(f"token expired ({err.message})", token_expired=True)
                        raise err
                    # Other types (hello, pong, refresh, ...) are handled by the transport or
                    # are newer than this client: ignored, as the protocol lets servers add them.
                raise _Resume("the gateway ended the stream")
            except _Resume as e:
                reason, delay = str(e), e.delay
                if e.token_expired:
                    self._expired_token = token
            except APIError as e:
                if not _retryable_status(e):
                    raise
                reason, delay = str(e), e.retry_after
            except (OSError, asyncio.TimeoutError, EOFError) as e:
                reason = repr(e)
            finally:
                if conn is not None:
                    await conn.close()
            # The backoff restarts only after a connection that stayed up a while: one that
            # reaches its state and drops at once, again and again (a gateway in trouble), must
            # not be hammered every few milliseconds.
            if started is not None and time.monotonic() - started >= 1.0:
                failures = 0
            else:
                failures += 1
                if self._max_attempts is not None and failures >= self._max_attempts:
                    raise TransportError(f"subscription to {self.run} gave up after {failures} "
                                         f"failed connection attempts; last: {reason}")
            # Move on to the next gateway: after a drop the old one may be dead or draining
            # ("reconnect (any gateway)"), and a list spreads reconnecting clients.
            index += 1
            wait = self._backoff.delay(failures)
            if delay is not None:
                # A Retry-After is honoured up to 5 minutes: a longer one (or a garbled huge
                # one) would silently park the subscription for hours.
                wait = max(wait, min(delay, MAX_SUBSCRIBE_RETRY_AFTER))
            log.info("runcast subscription %s: %s; reconnecting in %.2fs (cursor %s)",
                     self.run, reason, wait, self.cursor)
            await asyncio.sleep(wait)

    def _done(self) -> bool:
        return (self.until_finished and self._finished_seq is not None
                and self.cursor is not None and self.cursor >= self._finished_seq)

    def _check_run(self, run: str, frame: Dict[str, Any]) -> None:
        if run != self.run:
            raise ProtocolError(f"frame for run {run!r} on a subscription to {self.run!r}: "
                                f"{frame!r:.300}")

    async def _open(self, origin: Origin, token: Optional[str]) -> "_Conn":
        if self.transport == "ws":
            from ._ws import open_ws
            return await open_ws(origin, self.run, self.cursor, token, self._ssl,
                                 self._connect_timeout, self._idle_timeout, self._max_message,
                                 self._refresh_token)
        return await _open_sse(origin, self.run, self.cursor, token, self._ssl,
                               self._connect_timeout, self._idle_timeout, self._max_message)


def _retryable_status(e: APIError) -> bool:
    if e.status is None:
        return e.code in _RESUMABLE_CODES
    return e.status == 429 or (e.status >= 500 and e.status not in (501, 505))


class _Conn:
    """One connection of a subscription: yields the decoded frames of one run."""

    def frames(self) -> AsyncIterator[Dict[str, Any]]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def parse_frame(text: str) -> Dict[str, Any]:
    try:
        frame = json.loads(text)
    except ValueError:
        raise ProtocolError(f"frame is not JSON: {text[:200]!r}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError(f"frame is not an object with a string 'type': {text[:200]!r}")
    return frame


class _SSEConn(_Conn):
    def __init__(self, conn: _asynchttp.Connection, resp: _asynchttp.Response,
                 idle_timeout: float, max_message: int) -> None:
        self._conn = conn
        self._resp = resp
        self._idle = idle_timeout
        # A single line can hold a whole frame, so lines get the same bound as messages.
        self._parser = SSEParser(max_message, max_message)

    async def frames(self) -> AsyncIterator[Dict[str, Any]]:
        while True:
            try:
                # Heartbeat comments arrive every --heartbeat-interval (20 s by default), so a
                # silence longer than idle_timeout means the path to the gateway is dead even
                # though no FIN or RST arrived (a vanished host, a stuck proxy).
                data = await asyncio.wait_for(self._resp.read_some(), self._idle)
            except asyncio.TimeoutError:
                raise _Resume(f"nothing received for {self._idle:.0f}s") from None
            if not data:
                return
            for msg in self._parser.feed(data):
                yield parse_frame(msg.data)

    async def close(self) -> None:
        await self._conn.close()


async def _open_sse(origin: Origin, run: str, since: Optional[int], token: Optional[str],
                    ssl_context: Optional[ssl.SSLContext], connect_timeout: float,
                    idle_timeout: float, max_message: int) -> _SSEConn:
    conn = _asynchttp.Connection(origin, ssl_context)
    try:
        try:
            await conn.connect(connect_timeout)
        except ssl.SSLError as e:
            # Not resumable: a certificate or TLS-version problem does not fix itself.
            raise TransportError(f"TLS to {origin.url('')} failed: {e}") from e
        target = f"/v1/runs/{run}/stream"
        if since is not None:
            target += f"?since={since}"
        headers = [("Accept", "text/event-stream"), ("Cache-Control", "no-cache"),
                   ("User-Agent", "runcast-python")]
        if token:
            # A header, not ?access_token=: URLs end up in proxies' access logs.
            headers.append(("Authorization", f"Bearer {token}"))
        await conn.send("GET", target, headers, None)
        resp = await asyncio.wait_for(conn.read_head("GET"), connect_timeout)
        if resp.status != 200:
            body = await asyncio.wait_for(resp.read_all(64 * 1024), connect_timeout)
            raise error_from_response(resp.status, body, retry_after_seconds(resp.headers))
        ctype = resp.headers.get("content-type", "")
        if not ctype.lower().startswith("text/event-stream"):
            raise ProtocolError(f"{origin.url(target)} answered {ctype!r}, not text/event-stream")
        return _SSEConn(conn, resp, idle_timeout, max_message)
    except BaseException:
        await conn.close()
        raise


def subscribe(url: Union[str, Sequence[str]], run: str, since: Optional[int] = None,
              token: Optional[str] = None, get_token: Optional[TokenSource] = None, *,
              transport: str = "sse", until_finished: bool = False,
              ssl_context: Optional[ssl.SSLContext] = None, connect_timeout: float = 10.0,
              idle_timeout: float = 60.0, backoff: Backoff = SUBSCRIBE_BACKOFF,
              max_attempts: Optional[int] = None,
              max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> Subscription:
    """Follows `run`: yields its `State` first, then every `Event` (and `Gap`) in seq order,
    exactly once, across reconnects, until you stop iterating.

    - `url`: a gateway URL, or a list of them (gateways of one NATS-backed deployment); after a
      drop the next one is tried.
    - `since`: resume after this seq (replaying retained events after it); None starts at the
      run's current state.
    - `token` / `get_token`: a subscriber token, and/or a callable (sync or async) returning a
      fresh one; `get_token` is called for every reconnect and every `refresh` (WebSocket).
    - `until_finished`: stop after the run's `complete`/`error` event (or at once if the state
      says it already finished).
    - `idle_timeout`: reconnect when nothing, not even a heartbeat, arrived for this long.
    - `max_attempts`: raise `TransportError` after this many consecutive failed connection
      attempts (None: keep trying, as a browser's EventSource does).
    """
    if isinstance(url, str):
        urls = [url]
    elif isinstance(url, (list, tuple)):
        urls = list(url)
    else:
        raise InvalidRequestError("invalid_url",
                                  f"url must be a gateway URL or a list of them, not {url!r:.80}")
    return Subscription(urls, run, since, token, get_token, transport=transport,
                        until_finished=until_finished, ssl_context=ssl_context,
                        connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                        backoff=backoff, max_attempts=max_attempts,
                        max_message_bytes=max_message_bytes)


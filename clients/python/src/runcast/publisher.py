"""Publishing over a gateway's HTTP API: `Publisher` (blocking) and `AsyncPublisher` (asyncio).

Both send `POST /v1/runs/<run>/events` and share one retry rule (docs/protocol.md, "Safe
retries"): every publish call gets one idempotency key before its first attempt, and every retry
of that call carries the same key, so a publish whose answer was lost is stored once and the
retry gets the first copy's seq back.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _asynchttp
from ._common import (
    MAX_DEPTH,
    AsyncKinds,
    progress_data,
    PUBLISH_BACKOFF,
    Backoff,
    Origin,
    check_backoff,
    check_count,
    check_headers,
    check_id,
    check_kind,
    check_number,
    check_run,
    check_ssl_context,
    check_token,
    check_traceparent,
    encode_json,
    json_depth_ok,
    lower_headers,
    new_key,
    parse_origin,
    retry_after_seconds,
)
from ._errors import (
    APIError,
    InvalidRequestError,
    ProtocolError,
    RuncastError,
    TransportError,
    error_from_response,
)

__all__ = ["Publisher", "AsyncPublisher", "NewEvent"]

log = logging.getLogger("runcast")

MAX_RESPONSE_BYTES = 1024 * 1024
USER_AGENT = "runcast-python"

# 5xx answers that retrying cannot fix: 501/505 are about the request's form, and 507 means the
# bus is out of room, which does not clear up within a few backoff steps (the Rust SDK's
# HttpTarget makes the same exception).
_FINAL_5XX = (501, 505, 507)


@dataclass(frozen=True)
class NewEvent:
    """One event of a batch (`Publisher.publish_many`)."""

    kind: str
    data: Any
    id: Optional[str] = None
    traceparent: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        ev: Dict[str, Any] = {"kind": check_kind(self.kind), "data": check_data(self.data)}
        if self.id is not None:
            ev["id"] = check_id(self.id, "event id")
        if self.traceparent is not None:
            ev["traceparent"] = check_traceparent(self.traceparent)
        return ev


def check_data(data: Any) -> Any:
    """The gateway refuses data nested deeper than 64 levels (`data_too_deep`); checked here
    first, iteratively, so a very deep value is refused instead of overflowing json.dumps."""
    if not json_depth_ok(data):
        raise InvalidRequestError("data_too_deep", f"event data nests more than {MAX_DEPTH} levels")
    return data


@dataclass(frozen=True)
class _Retry:
    delay: float
    error: APIError


class _Core:
    """Everything about a publish that does not depend on how bytes move: the request, the retry
    decision, reading the answer. The sync and async publishers are thin drivers around it."""

    def __init__(self, url: str, run: str, key: Optional[str], timeout: float, max_attempts: int,
                 backoff: Backoff, max_retry_after: float,
                 headers: Optional[Mapping[str, str]]) -> None:
        self.origin: Origin = parse_origin(url)
        self.run = check_run(run)
        self.timeout = check_number(timeout, "timeout")
        self.max_attempts = check_count(max_attempts, "max_attempts")
        self.backoff = check_backoff(backoff)
        self.max_retry_after = check_number(max_retry_after, "max_retry_after", allow_zero=True)
        self.target = f"/v1/runs/{self.run}/events"
        extra = check_headers(headers)
        given = {k.lower() for k, _ in extra}
        # Accept and User-Agent are ours unless `headers=` names them (then theirs, not both).
        hdrs: List[Tuple[str, str]] = [("Content-Type", "application/json")]
        hdrs += [(k, v) for k, v in (("Accept", "application/json"), ("User-Agent", USER_AGENT))
                 if k.lower() not in given]
        if key is not None:
            hdrs.append(("Authorization", f"Bearer {check_token(key, 'publish key', 'invalid_key')}"))
        self.headers = hdrs + extra

    def request(self, events: Union[Dict[str, Any], List[Dict[str, Any]]],
                idempotency_key: Optional[str], traceparent: Optional[str]
                ) -> Tuple[List[Tuple[str, str]], bytes, str]:
        key = check_id(idempotency_key, "idempotency key", 120) if idempotency_key else new_key()
        hdrs = list(self.headers) + [("Idempotency-Key", key)]
        if traceparent is not None:
            hdrs.append(("traceparent", check_traceparent(traceparent)))
        return hdrs, encode_json(events), key

    def decide(self, status: int, headers: Mapping[str, str], body: bytes, n: int,
               attempt: int) -> Union[List[int], _Retry]:
        """The seqs of a successful answer, a `_Retry`, or raises the final error."""
        if status == 200:
            return self._seqs(body, n)
        ra = retry_after_seconds(headers)
        err = error_from_response(status, body, ra)
        retryable = status in (408, 429) or (status >= 500 and status not in _FINAL_5XX)
        if not retryable:
            raise err
        if ra is not None and ra > self.max_retry_after:
            # Honouring a Retry-After this long would block the caller for longer than it agreed
            # to; report it instead of quietly retrying sooner than the gateway asked.
            raise err
        delay = self.backoff.delay(attempt)
        if ra is not None:
            delay = max(delay, ra)
        return _Retry(delay, err)

    def _seqs(self, body: bytes, n: int) -> List[int]:
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"publish answer is not JSON: {body[:200]!r}") from None
        seqs = doc.get("seqs") if isinstance(doc, dict) else None
        if (not isinstance(seqs, list) or len(seqs) != n
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in seqs)):
            raise ProtocolError(f"publish answer without {n} seqs: {body[:200]!r}")
        if doc.get("run") not in (None, self.run):
            raise ProtocolError(f"publish answer for another run: {body[:200]!r}")
        return seqs

    def give_up(self, last: Optional[BaseException], maybe_stored: bool, key: str,
                attempts: int) -> RuncastError:
        if isinstance(last, RuncastError):
            err: RuncastError = last
        else:
            hint = (" The event may have been stored; publishing again with the same "
                    "idempotency_key is safe." if maybe_stored else "")
            err = TransportError(f"could not publish to {self.origin.url(self.target)} after "
                                 f"{attempts} attempt(s): {last!r}.{hint}")
        err.maybe_stored = maybe_stored
        err.idempotency_key = key
        return err


def _event(kind: str, data: Any, id: Optional[str]) -> Dict[str, Any]:
    return NewEvent(kind, data, id).to_json()


def _batch(events: Sequence[Union[NewEvent, Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, (list, tuple)):
        raise InvalidRequestError("invalid_event",
                                  f"a batch is a list of events, not {events!r:.80}")
    out = []
    for e in events:
        if isinstance(e, NewEvent):
            out.append(e.to_json())
        elif isinstance(e, Mapping) and "kind" in e and "data" in e:
            out.append(NewEvent(e["kind"], e["data"], e.get("id"), e.get("traceparent")).to_json())
        else:
            raise InvalidRequestError("invalid_event", f"not an event: {e!r}")
    if not out:
        raise InvalidRequestError("invalid_event", "a batch needs at least one event")
    return out


class Publisher:
    """Publishes one run's events through a gateway's HTTP API, blocking.

    ::

        with Publisher("http://127.0.0.1:8080", "nightly-42", key=KEY) as p:
            p.status("compiling")
            p.progress(3, 10)
            p.complete({"artifacts": 2})

    Each method returns the event's seq. A publisher keeps one keep-alive connection; it may be
    shared by threads (calls are serialized).
    """

    def __init__(self, url: str, run: str, key: Optional[str] = None, *, timeout: float = 10.0,
                 max_attempts: int = 5, backoff: Backoff = PUBLISH_BACKOFF,
                 max_retry_after: float = 30.0, ssl_context: Optional[ssl.SSLContext] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        self._core = _Core(url, run, key, timeout, max_attempts, backoff, max_retry_after, headers)
        self._ssl = check_ssl_context(ssl_context)
        self._conn: Optional[http.client.HTTPConnection] = None
        self._conn_requests = 0
        self._lock = threading.Lock()

    @property
    def run(self) -> str:
        return self._core.run

    # --------------------------------------------------------------------------- helpers

    def progress(self, done: float, total: Optional[float] = None, **extra: Any) -> int:
        """`progress` `{"done": done, "total": total, ...extra}`."""
        return self.publish("progress", progress_data(done, total, extra))

    def log(self, line: str, **extra: Any) -> int:
        """`log` `{"line": line, ...extra}`."""
        return self.publish("log", {"line": line, **extra})

    def status(self, state: str, **extra: Any) -> int:
        """`status` `{"state": state, ...extra}`."""
        return self.publish("status", {"state": state, **extra})

    def complete(self, result: Any = None) -> int:
        """`complete` with `result` as its data (`{}` when None). The run becomes `completed`."""
        return self.publish("complete", {} if result is None else result)

    def error(self, message: str, **extra: Any) -> int:
        """`error` `{"message": message, ...extra}`. The run becomes `failed`."""
        return self.publish("error", {"message": message, **extra})

    def publish(self, kind: str, data: Any, *, id: Optional[str] = None,
                idempotency_key: Optional[str] = None, traceparent: Optional[str] = None) -> int:
        """Publishes one event of any kind; returns its seq.

        `id` is the event's own idempotency id (stable across process restarts, e.g.
        `"job-7/step-3"`); otherwise a random `Idempotency-Key` covers this call's retries.
        """
        return self._send(_event(kind, data, id), 1, idempotency_key, traceparent)[0]

    def publish_many(self, events: Sequence[Union[NewEvent, Mapping[str, Any]]], *,
                     idempotency_key: Optional[str] = None,
                     traceparent: Optional[str] = None) -> List[int]:
        """Publishes a batch, all or nothing, in order; returns their seqs."""
        batch = _batch(events)
        return self._send(batch, len(batch), idempotency_key, traceparent)

    # --------------------------------------------------------------------------- transport

    def _send(self, body: Any, n: int, idem: Optional[str],
              traceparent: Optional[str]) -> List[int]:
        core = self._core
        headers, payload, key = core.request(body, idem, traceparent)
        last: Optional[BaseException] = None
        maybe_stored = False
        attempt = 0
        delay = 0.0
        with self._lock:
            while attempt < core.max_attempts:
                if attempt:
                    log.warning("runcast publish to %s failed (%s); retry %d of %d in %.2fs "
                                "with the same idempotency key", core.run, _brief(last), attempt,
                                core.max_attempts - 1, delay)
                    time.sleep(delay)
                attempt += 1
                try:
                    status, rheaders, rbody = self._roundtrip(headers, payload)
                except RuncastError as e:
                    _annotate(e, maybe_stored, key)
                    raise
                except _Unsent as e:
                    last, delay = e.__cause__, core.backoff.delay(attempt - 1)
                    continue
                except _Lost as e:
                    maybe_stored = True
                    last, delay = e.__cause__, core.backoff.delay(attempt - 1)
                    continue
                try:
                    decision = core.decide(status, rheaders, rbody, n, attempt - 1)
                except ProtocolError as e:
                    # A 200 this client cannot read: the request reached a server, which may
                    # have stored the event.
                    e.maybe_stored, e.idempotency_key = True, key
                    raise
                except RuncastError as e:
                    e.maybe_stored, e.idempotency_key = maybe_stored, key
                    raise
                if isinstance(decision, _Retry):
                    last, delay = decision.error, decision.delay
                    continue
                return decision
        raise core.give_up(last, maybe_stored, key, attempt)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            o = self._core.origin
            if o.tls:
                ctx = self._ssl or ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(o.host, o.port, timeout=self._core.timeout,
                                                         context=ctx)
            else:
                self._conn = http.client.HTTPConnection(o.host, o.port, timeout=self._core.timeout)
            self._conn_requests = 0
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _roundtrip(self, headers: List[Tuple[str, str]], payload: bytes
                   ) -> Tuple[int, Dict[str, str], bytes]:
        try:
            return self._roundtrip_once(headers, payload)
        except BaseException:
            # Whatever went wrong mid-request (an interrupt, a bug, a malformed answer), the
            # connection may hold half a request or an unread answer: never reuse it, or the next
            # call would read this call's answer as its own.
            self._drop_connection()
            raise

    def _roundtrip_once(self, headers: List[Tuple[str, str]], payload: bytes
                        ) -> Tuple[int, Dict[str, str], bytes]:
        # A kept-alive connection may have been closed by the gateway while idle; that shows up
        # as a reset on the next request. One immediate retry on a fresh connection covers it
        # (safe: the idempotency key is the same), without spending one of the caller's attempts.
        for fresh_try in (False, True):
            conn = self._connection()
            reused = self._conn_requests > 0
            try:
                if conn.sock is None:
                    try:
                        conn.connect()
                    except ssl.SSLError as e:
                        self._drop_connection()
                        raise _tls_error(self._core.origin, e) from e
                    except OSError as e:
                        self._drop_connection()
                        raise _Unsent() from e
                self._conn_requests += 1
                conn.putrequest("POST", self._core.origin.base_path + self._core.target,
                                skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(payload)))
                conn.endheaders(payload)
                resp = conn.getresponse()
                rheaders = lower_headers(resp.getheaders())
                body = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(body) > MAX_RESPONSE_BYTES:
                    self._drop_connection()
                    raise ProtocolError(f"response body over {MAX_RESPONSE_BYTES} bytes")
                if resp.length:
                    # read(amt) returns what came before the connection closed without raising:
                    # a body shorter than its Content-Length is an answer cut off, not a
                    # malformed one. The gateway may have stored the event: retry with the key.
                    raise http.client.IncompleteRead(body, resp.length)
                if resp.will_close:
                    self._drop_connection()
                return resp.status, rheaders, body
            except (http.client.RemoteDisconnected, http.client.IncompleteRead,
                    ConnectionError, TimeoutError, OSError) as e:
                self._drop_connection()
                if isinstance(e, ssl.SSLError):
                    raise _tls_error(self._core.origin, e) from e
                if reused and not fresh_try and isinstance(
                        e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)):
                    continue
                raise _Lost() from e
            except http.client.HTTPException as e:
                self._drop_connection()
                raise ProtocolError(f"malformed HTTP answer from "
                                    f"{self._core.origin.url(self._core.target)}: {e!r}") from e
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(AsyncKinds):
    """`Publisher` for asyncio: the same methods, awaited.

    ::

        async with AsyncPublisher("http://127.0.0.1:8080", "nightly-42") as p:
            await p.progress(3, 10)

    Calls on one publisher are serialized (one keep-alive connection), which also keeps a run's
    events in the order they were awaited.
    """

    def __init__(self, url: str, run: str, key: Optional[str] = None, *, timeout: float = 10.0,
                 max_attempts: int = 5, backoff: Backoff = PUBLISH_BACKOFF,
                 max_retry_after: float = 30.0, ssl_context: Optional[ssl.SSLContext] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        self._core = _Core(url, run, key, timeout, max_attempts, backoff, max_retry_after, headers)
        self._ssl = check_ssl_context(ssl_context)
        self._conn: Optional[_asynchttp.Connection] = None
        # Created on first use: an asyncio.Lock made outside a running loop binds to the wrong
        # loop on Python 3.9.
        self._lock: Optional[asyncio.Lock] = None

    @property
    def run(self) -> str:
        return self._core.run

    async def publish(self, kind: str, data: Any, *, id: Optional[str] = None,
                      idempotency_key: Optional[str] = None,
                      traceparent: Optional[str] = None) -> int:
        return (await self._send(_event(kind, data, id), 1, idempotency_key, traceparent))[0]

    async def publish_many(self, events: Sequence[Union[NewEvent, Mapping[str, Any]]], *,
                           idempotency_key: Optional[str] = None,
                           traceparent: Optional[str] = None) -> List[int]:
        batch = _batch(events)
        return await self._send(batch, len(batch), idempotency_key, traceparent)

    async def _send(self, body: Any, n: int, idem: Optional[str],
                    traceparent: Optional[str]) -> List[int]:
        core = self._core
        headers, payload, key = core.request(body, idem, traceparent)
        if self._lock is None:
            self._lock = asyncio.Lock()
        last: Optional[BaseException] = None
        maybe_stored = False
        attempt = 0
        delay = 0.0
        async with self._lock:
            while attempt < core.max_attempts:
                if attempt:
                    log.warning("runcast publish to %s failed (%s); retry %d of %d in %.2fs "
                                "with the same idempotency key", core.run, _brief(last), attempt,
                                core.max_attempts - 1, delay)
                    await asyncio.sleep(delay)
                attempt += 1
                try:
                    status, rheaders, rbody = await asyncio.wait_for(
                        self._roundtrip(headers, payload), core.timeout)
                except RuncastError as e:
                    _annotate(e, maybe_stored, key)
                    raise
                except _Unsent as e:
                    last, delay = e.__cause__, core.backoff.delay(attempt - 1)
                    continue
                except (_Lost, asyncio.TimeoutError) as e:
                    await self._drop()
                    maybe_stored = True
                    last = e.__cause__ if isinstance(e, _Lost) else TimeoutError(
                        f"no answer within {core.timeout}s")
                    delay = core.backoff.delay(attempt - 1)
                    continue
                try:
                    decision = core.decide(status, rheaders, rbody, n, attempt - 1)
                except ProtocolError as e:
                    # A 200 this client cannot read: the request reached a server, which may
                    # have stored the event.
                    e.maybe_stored, e.idempotency_key = True, key
                    raise
                except RuncastError as e:
                    e.maybe_stored, e.idempotency_key = maybe_stored, key
                    raise
                if isinstance(decision, _Retry):
                    last, delay = decision.error, decision.delay
                    continue
                return decision
        raise core.give_up(last, maybe_stored, key, attempt)

    async def _roundtrip(self, headers: List[Tuple[str, str]], payload: bytes
                         ) -> Tuple[int, Dict[str, str], bytes]:
        try:
            return await self._roundtrip_once(headers, payload)
        except BaseException:
            # Cancelled (asyncio.wait_for, task.cancel()) or failed mid-request: the connection
            # may hold half a request or an unread answer, which the next call would read as its
            # own. Drop it at once (no await: a cancelled task must not block here).
            self._abort()
            raise

    def _abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    async def _roundtrip_once(self, headers: List[Tuple[str, str]], payload: bytes
                              ) -> Tuple[int, Dict[str, str], bytes]:
        o = self._core.origin
        for fresh_try in (False, True):
            conn = self._conn
            if conn is None or not conn.open or not conn.reusable:
                if conn is not None:
                    await conn.close()
                conn = self._conn = _asynchttp.Connection(o, self._ssl)
                try:
                    await conn.connect(self._core.timeout)
                except ssl.SSLError as e:
                    await self._drop()
                    raise _tls_error(o, e) from e
                except (OSError, asyncio.TimeoutError) as e:
                    await self._drop()
                    raise _Unsent() from e
            reused = conn.requests > 0
            try:
                await conn.send("POST", self._core.target, headers, payload)
                resp = await conn.read_head("POST")
                body = await resp.read_all(MAX_RESPONSE_BYTES)
                if not conn.reusable:
                    await self._drop()
                return resp.status, resp.headers, body
            except ProtocolError:
                await self._drop()
                raise
            except ssl.SSLError as e:
                await self._drop()
                raise _tls_error(o, e) from e
            except OSError as e:
                await self._drop()
                if reused and not fresh_try and isinstance(e, (_asynchttp.Dropped,
                                                              ConnectionResetError,
                                                              BrokenPipeError)):
                    continue
                raise _Lost() from e
        raise AssertionError("unreachable")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        await self._drop()

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _annotate(e: RuncastError, maybe_stored: bool, key: str) -> None:
    # A ProtocolError is about an answer, so the request reached a server that may have stored
    # the event; a TLS failure happens before anything is sent.
    e.maybe_stored = maybe_stored or isinstance(e, ProtocolError)
    e.idempotency_key = key


def _brief(e: Optional[BaseException]) -> str:
    return str(e) if isinstance(e, RuncastError) else repr(e)


class _Unsent(Exception):
    """Internal: the attempt failed before the request could reach the gateway."""


class _Lost(Exception):
    """Internal: the request may have reached the gateway, but no complete answer came back."""


def _tls_error(origin: Origin, e: ssl.SSLError) -> TransportError:
    # Not retried: an untrusted certificate or TLS spoken to a plain port does not fix itself,
    # and retrying would only hide the cause (docs/security.md, TLS clients).
    return TransportError(f"TLS to {origin.url('')} failed: {e}. Check the URL scheme and that "
                          f"ssl_context trusts the gateway's certificate.")

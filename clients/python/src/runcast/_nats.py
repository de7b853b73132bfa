"""`NatsPublisher`: publishing straight to NATS JetStream (docs/publishing.md, "The NATS
contract"), on the optional nats-py package (`pip install runcast[nats]`).

Each event goes to `<prefix>.runs.<run>.<kind>` through JetStream with a `Nats-Msg-Id` chosen
before the first attempt and kept for every retry, so JetStream's duplicate window stores it once
however often the acknowledgement is lost. The acknowledgement's sequence is the event's seq.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Union

from ._common import (
    AsyncKinds,
    MAX_DEPTH,
    PUBLISH_BACKOFF,
    Backoff,
    check_backoff,
    check_count,
    check_id,
    check_kind,
    check_number,
    check_run,
    check_traceparent,
    encode_json,
    json_depth_ok,
    new_key,
)
from ._errors import (
    CapacityError,
    InvalidRequestError,
    ProtocolError,
    RuncastError,
    ServerError,
    TransportError,
)

__all__ = ["NatsPublisher"]

log = logging.getLogger("runcast")

try:
    import nats
    import nats.errors as nats_errors
    import nats.js.errors as js_errors
    from nats.aio.client import Client as NATSClient
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("NatsPublisher needs nats-py: pip install 'runcast[nats]'") from _e

_STREAM_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
_PREFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class NatsPublisher(AsyncKinds):
    """Publishes one run's events to NATS JetStream; async.

    ::

        pub = NatsPublisher("nats://127.0.0.1:4222", "nightly-42")
        seq = await pub.progress(3, 10)
        await pub.close()

    `nc` is a nats-py client you already connected (it stays yours: `close()` leaves it open),
    or server URL(s) to connect to on first use (then `close()` drains that connection).
    """

    def __init__(self, nc: Union["NATSClient", str, Sequence[str]], run: str, *,
                 prefix: str = "runcast", stream: Optional[str] = "RUNCAST_EVENTS",
                 timeout: float = 5.0, max_attempts: int = 5,
                 backoff: Backoff = PUBLISH_BACKOFF,
                 connect_options: Optional[Dict[str, Any]] = None) -> None:
        if not isinstance(prefix, str) or not prefix or not set(prefix) <= _PREFIX_CHARS \
                or ".." in prefix or prefix.startswith(".") or prefix.endswith("."):
            raise InvalidRequestError("invalid_prefix", f"bad subject prefix {prefix!r}")
        if stream is not None and (not isinstance(stream, str)
                                   or not _STREAM_RE.fullmatch(stream)):
            raise InvalidRequestError("invalid_option", f"bad stream name {stream!r}")
        self.run = check_run(run)
        self.prefix = prefix
        self.stream = stream
        self.timeout = check_number(timeout, "timeout")
        self.max_attempts = check_count(max_attempts, "max_attempts")
        self.backoff = check_backoff(backoff)
        if isinstance(nc, (str, list, tuple)):
            if isinstance(nc, (list, tuple)) and (not nc or not all(isinstance(u, str)
                                                                      for u in nc)):
                raise InvalidRequestError("invalid_url", "NATS servers must be URL strings")
            self._servers: Optional[List[str]] = [nc] if isinstance(nc, str) else list(nc)
            self._nc: Optional[Any] = None
            self._own = True
        else:
            self._servers = None
            self._nc = nc
            self._own = False
        if connect_options is not None and not isinstance(connect_options, dict):
            raise InvalidRequestError("invalid_option", "connect_options must be a dict")
        self._connect_options = dict(connect_options or {})
        self._js: Optional[Any] = None
        self._lock: Optional[asyncio.Lock] = None

    def subject(self, kind: str) -> str:
        return f"{self.prefix}.runs.{self.run}.{check_kind(kind)}"

    # --------------------------------------------------------------------------- helpers

    async def publish(self, kind: str, data: Any, *, id: Optional[str] = None,
                      idempotency_key: Optional[str] = None,
                      traceparent: Optional[str] = None) -> int:
        """Publishes one event and waits for JetStream's ack; returns the ack's seq.

        The `Nats-Msg-Id` is the one the gateway gives the same event published over HTTP, so
        the two deduplicate against each other:

        - `id` (the event's own idempotency id): `<run>/<id>`;
        - else `idempotency_key` (as the HTTP `Idempotency-Key` of a one-event request):
          `<run>/<key>`;
        - else a random key, chosen before the first attempt and reported as the error's
          `idempotency_key`.
        """
        subject = self.subject(kind)
        # Publishing to NATS skips the gateway's checks, so the ones that protect other clients
        # are made here (docs/protocol.md, Event data: 64 levels at most).
        if not json_depth_ok(data):
            raise InvalidRequestError("data_too_deep",
                                      f"event data nests more than {MAX_DEPTH} levels")
        payload = encode_json(data)
        key = check_id(idempotency_key, "idempotency key", 120) if idempotency_key else new_key()
        msg_id = f"{self.run}/{check_id(id, 'event id') if id is not None else key}"
        headers = {"Nats-Msg-Id": msg_id}
        if traceparent is not None:
            headers["traceparent"] = check_traceparent(traceparent)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                return await self._publish(subject, payload, headers, msg_id)
            except RuncastError as e:
                e.idempotency_key = key
                raise

    async def _publish(self, subject: str, payload: bytes, headers: Dict[str, str],
                       msg_id: str) -> int:
        last: Optional[BaseException] = None
        maybe_stored = False
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self.backoff.delay(attempt))
            js = await self._jetstream()
            self._check_size(subject, payload, headers)
            try:
                ack = await js.publish(subject, payload, timeout=self.timeout, stream=self.stream,
                                       headers=headers)
            except nats_errors.MaxPayloadError as e:
                raise InvalidRequestError("too_large", f"event over NATS max_payload: {e}") from e
            except (nats_errors.NoRespondersError, js_errors.NoStreamResponseError) as e:
                # Nothing captured the subject (yet): the stream is created by gateways and
                # workers at start-up, so this can clear up. Not stored.
                last = e
            except js_errors.ServiceUnavailableError as e:
                last = e
            except js_errors.APIError as e:
                raise _api_error(e) from e
            except (nats_errors.ConnectionClosedError, nats_errors.ConnectionDrainingError) as e:
                if self._own:
                    # Ours, and closed for good (its reconnects ran out): the next call
                    # connects afresh instead of failing forever.
                    self._nc = self._js = None
                raise TransportError(f"the NATS connection is closed: {e!r}",
                                     maybe_stored=maybe_stored, idempotency_key=msg_id) from e
            except (nats_errors.TimeoutError, asyncio.TimeoutError,
                    nats_errors.ConnectionReconnectingError,
                    nats_errors.OutboundBufferLimitError, nats_errors.StaleConnectionError,
                    OSError) as e:
                # The publish may have reached the server and only the ack was lost.
                maybe_stored = True
                last = e
            else:
                if not isinstance(getattr(ack, "seq", None), int) or ack.seq < 1:
                    raise ProtocolError(f"JetStream ack without a seq: {ack!r}")
                return int(ack.seq)
            if attempt + 1 < self.max_attempts:
                log.warning("runcast NATS publish to %s (Nats-Msg-Id %s): %r; retrying",
                            subject, msg_id, last)
        hint = (" It may still be stored; publishing again with the same id is safe within the "
                "stream's duplicate window." if maybe_stored else "")
        raise TransportError(f"no JetStream ack for {subject} after {self.max_attempts} "
                             f"attempts: {last!r}.{hint}", maybe_stored=maybe_stored,
                             idempotency_key=msg_id)

    def _check_size(self, subject: str, payload: bytes, headers: Dict[str, str]) -> None:
        """Refuses an event NATS would refuse for its size. Sent anyway, the server closes the
        whole connection ("Maximum Payload Violation"), which on a shared client takes every
        other user of it down too. nats-py checks only the payload; the server counts the
        header block as sent (`NATS/1.0`, one line per header, a blank line) plus the payload,
        and `js.publish` adds `Nats-Expected-Stream`."""
        limit = getattr(self._nc, "max_payload", None)
        if not isinstance(limit, int) or limit <= 0:
            return
        hdrs = dict(headers)
        if self.stream is not None:
            hdrs["Nats-Expected-Stream"] = self.stream
        size = len(b"NATS/1.0\r\n") + sum(len(k.encode()) + len(v.encode()) + 4
                                          for k, v in hdrs.items()) + 2 + len(payload)
        if size > limit:
            raise InvalidRequestError(
                "too_large", f"the event on {subject} is {size} bytes with its headers, over the "
                f"NATS server's max_payload of {limit} bytes; nothing was sent")

    async def _jetstream(self) -> Any:
        if self._js is None:
            if self._nc is None:
                self._nc = await self._connect()
            self._js = self._nc.jetstream()
        return self._js

    async def _connect(self) -> Any:
        """Connects to the publisher's own servers, bounded: at most `timeout` per attempt and
        `timeout * max_attempts` in all (nats-py alone keeps trying for minutes)."""
        opts: Dict[str, Any] = {"connect_timeout": self.timeout}
        opts.update(self._connect_options)
        budget = self.timeout * self.max_attempts
        nc = NATSClient()
        try:
            await asyncio.wait_for(nc.connect(servers=self._servers or [], **opts), budget)
        except BaseException as e:
            try:
                await asyncio.wait_for(nc.close(), 1.0)
            except (asyncio.TimeoutError, nats_errors.Error, OSError):
                pass
            if isinstance(e, asyncio.TimeoutError):
                raise TransportError(f"could not connect to NATS {self._servers} within "
                                     f"{budget:g}s (timeout x max_attempts)") from e
            if isinstance(e, ValueError):
                raise InvalidRequestError("invalid_url",
                                          f"bad NATS server URL in {self._servers}: {e}") from e
            if isinstance(e, (OSError, nats_errors.Error)):
                raise TransportError(f"could not connect to NATS {self._servers}: {e!r}") from e
            raise
        return nc

    async def close(self) -> None:
        """Drains and closes the connection if this publisher opened it."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and self._own:
            try:
                await asyncio.wait_for(nc.drain(), 5.0)
            except (asyncio.TimeoutError, nats_errors.Error, OSError):
                await nc.close()

    async def __aenter__(self) -> "NatsPublisher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _api_error(e: "js_errors.APIError") -> RuncastError:
    desc = (e.description or "").lower()
    text = f"JetStream refused the event: {e.description or e!r} (code {e.code}, err {e.err_code})"
    if "insufficient resources" in desc or "maximum" in desc and "size" not in desc:
        return CapacityError("capacity", text, None)
    if "size" in desc or "payload" in desc:
        return InvalidRequestError("too_large", text, None)
    if e.code is not None and 400 <= e.code < 500:
        return InvalidRequestError("rejected", text, None)
    return ServerError("nats_error", text, None)

"""Exceptions.

Every failure the client reports is a `RuncastError`. Errors the gateway answered carry the
protocol's stable `code` (docs/protocol.md, "Error codes") so callers can branch on it without
parsing messages; the class hierarchy groups codes by what a caller can do about them.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Type

__all__ = [
    "RuncastError",
    "APIError",
    "InvalidRequestError",
    "UnauthorizedError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "RateLimitedError",
    "ServerError",
    "UnavailableError",
    "CapacityError",
    "TransportError",
    "ProtocolError",
    "ClosedError",
]


class RuncastError(Exception):
    """Base class of every error raised by this package.

    `code` is the protocol's error code (`invalid_kind`, `unauthorized`, ...) when the gateway
    sent one, otherwise a client-side code (`transport`, `protocol`, `http_<status>`).
    """

    code: str
    message: str
    status: Optional[int]
    #: Set on errors raised by a publish: True when an attempt may have reached the gateway, so
    #: the event may be stored even though the call failed.
    maybe_stored: bool = False
    #: Set on errors raised by a publish: the idempotency key its attempts carried. Publishing
    #: again with it is safe (stored at most once within the gateway's duplicate window).
    idempotency_key: Optional[str] = None

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        self.code = code
        self.message = message
        self.status = status
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"


class APIError(RuncastError):
    """The gateway refused a request (an HTTP error status, or an `error` frame on a stream)."""

    retry_after: Optional[float]
    run: Optional[str]

    def __init__(self, code: str, message: str, status: Optional[int] = None,
                 retry_after: Optional[float] = None, run: Optional[str] = None) -> None:
        self.retry_after = retry_after
        self.run = run
        super().__init__(code, message, status)


class InvalidRequestError(APIError, ValueError):
    """The request itself is wrong (400, 413, other 4xx): fix it, retrying cannot help.

    Also raised before anything is sent for run IDs and kinds that break the protocol's rules,
    which is why it is a `ValueError` too.
    """


class UnauthorizedError(APIError):
    """401: a missing, invalid or expired token or publish key. Never retried automatically."""


class ForbiddenError(APIError):
    """403 / `forbidden`: the token or key is valid but does not cover this run."""


class NotFoundError(APIError):
    """404: `run_not_found` or `not_found` (a wrong base URL, usually)."""


class ConflictError(APIError):
    """409 `conflict` (admin API)."""


class RateLimitedError(APIError):
    """429 `rate_limited`, still refused after the retries (or Retry-After beyond the cap)."""


class ServerError(APIError):
    """5xx: the gateway or its bus failed."""


class UnavailableError(ServerError):
    """503 `unavailable` / `draining`, still refused after the retries."""


class CapacityError(ServerError):
    """507 `capacity`: the bus is out of room. Not retried: it does not fix itself in seconds."""


class TransportError(RuncastError):
    """The gateway (or NATS) could not be reached, or the answer was lost, on every attempt;
    or TLS failed (not retried: a certificate problem does not fix itself).

    For a publish, `maybe_stored` is True when at least one attempt may have reached the gateway:
    the event may be stored. Publishing again with the same `idempotency_key` (or event `id`)
    is safe: the gateway answers with the first copy's seq instead of storing it twice.
    """

    def __init__(self, message: str, *, maybe_stored: bool = False,
                 idempotency_key: Optional[str] = None) -> None:
        super().__init__("transport", message, None)
        self.maybe_stored = maybe_stored
        self.idempotency_key = idempotency_key


class ProtocolError(RuncastError):
    """The gateway sent something this client cannot read: a malformed frame or response, an
    oversized line, a wrong content type. Raised rather than skipped, so nothing is lost
    silently."""

    def __init__(self, message: str) -> None:
        super().__init__("protocol", message, None)


class ClosedError(RuncastError):
    """The gateway closed a WebSocket with a code that says "do not reconnect" (1008 policy,
    1009 too big, 4400-4999, ...; docs/protocol.md, Close codes). `close_code` holds it."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__("closed", f"WebSocket closed with {close_code}: {reason or '(no reason)'}")
        self.close_code = close_code


_BY_STATUS: Dict[int, Type[APIError]] = {
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitedError,
    503: UnavailableError,
    507: CapacityError,
}

_BY_CODE: Dict[str, Type[APIError]] = {
    "unauthorized": UnauthorizedError,
    "forbidden": ForbiddenError,
    "run_not_found": NotFoundError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "rate_limited": RateLimitedError,
    "unavailable": UnavailableError,
    "draining": UnavailableError,
    "capacity": CapacityError,
    "internal": ServerError,
}


def error_class(status: Optional[int], code: str) -> Type[APIError]:
    """The class for a refusal: by HTTP status when there is one, else by code (stream frames)."""
    if status is not None:
        cls = _BY_STATUS.get(status)
        if cls is not None:
            return cls
        if status >= 500:
            return ServerError
        return InvalidRequestError
    return _BY_CODE.get(code, InvalidRequestError)


def error_from_response(status: int, body: bytes, retry_after: Optional[float] = None) -> APIError:
    """Builds the exception for an HTTP error response.

    The gateway's errors are `{"error":{"code":..,"message":..}}`; a few refusals come before the
    gateway reads the request and have no body (docs/protocol.md, HTTP API), so those get
    `http_<status>` and whatever text there was.
    """
    code = f"http_{status}"
    message = ""
    try:
        doc: Any = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        if isinstance(err.get("code"), str) and err["code"]:
            code = err["code"]
        if isinstance(err.get("message"), str):
            message = err["message"]
    if not message:
        text = body[:300].decode("utf-8", "replace").strip()
        message = text or "(no error body)"
    return error_class(status, code)(code, message, status, retry_after)


def error_from_frame(frame: Dict[str, Any]) -> APIError:
    """Builds the exception for an `error` frame received on a stream."""
    code = frame.get("code")
    message = frame.get("message")
    if not isinstance(code, str) or not code:
        raise ProtocolError(f"error frame without a code: {_short(frame)}")
    run = frame.get("run") if isinstance(frame.get("run"), str) else None
    status = {"unauthorized": 401, "forbidden": 403}.get(code)
    return error_class(status, code)(code, message if isinstance(message, str) else "", status,
                                     None, run)


def _short(obj: Any, limit: int = 300) -> str:
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError):
        text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."

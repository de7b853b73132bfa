"""Checks, encoding and retry timing shared by the publishers and the subscriber."""

from __future__ import annotations

import email.utils
import json
import math
import random
import re
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from ._errors import InvalidRequestError

_RUN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_KIND_RE = re.compile(r"[a-z0-9_-]{1,64}")
# An `id` / Idempotency-Key is 1-128 visible ASCII characters (docs/protocol.md, Safe retries).
_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
MAX_DEPTH = 64
#: A token or key goes into an `Authorization: Bearer` header: visible ASCII only (a JWT is
#: base64url segments joined by dots), so no CR/LF can inject a header and no space can split it.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,16384}")
# An HTTP header name (RFC 9110 token) and a value without control characters.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e]{0,8192}")
#: Headers the client sets itself; `headers=` may not replace them (a second Content-Length or
#: Idempotency-Key would corrupt the request or defeat the safe retries).
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive",
    "te", "trailer", "upgrade", "expect", "authorization", "idempotency-key", "traceparent",
})
#: The longest Retry-After a subscription honours; a longer one is cut to this.
MAX_SUBSCRIBE_RETRY_AFTER = 300.0


def check_run(run: str) -> str:
    # Checked on the client too: on NATS the run becomes a subject token, so `a.b` or `*` would
    # silently publish somewhere else instead of being refused.
    if not isinstance(run, str) or not _RUN_RE.fullmatch(run):
        raise InvalidRequestError(
            "invalid_run_id", f"run ID {run!r} must be 1-128 characters of A-Z, a-z, 0-9, '_', '-'")
    return run


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise InvalidRequestError(
            "invalid_kind", f"event kind {kind!r} must be 1-64 characters of a-z, 0-9, '_', '-'")
    return kind


def check_id(value: str, what: str, limit: int = 128) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or len(value) > limit:
        raise InvalidRequestError(
            "invalid_event", f"{what} {value!r} must be 1-{limit} visible ASCII characters")
    return value


def check_token(value: Any, what: str = "token", code: str = "invalid_token") -> str:
    """A bearer token or publish key: 1-16384 visible ASCII characters (no space, no CR/LF)."""
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        shown = "a non-string" if not isinstance(value, str) else f"{len(value)} characters"
        # The value itself is not echoed: it is a secret.
        raise InvalidRequestError(
            code, f"{what} must be 1-16384 visible ASCII characters without spaces "
            f"or line breaks (got {shown})")
    return value


def check_traceparent(value: Any) -> str:
    """A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), checked the way the gateway checks
    it (it drops a malformed one); refused here instead of being sent as a header."""
    ok = isinstance(value, str) and len(value) <= 256 and _traceparent_ok(value)
    if not ok:
        raise InvalidRequestError(
            "invalid_traceparent",
            f"traceparent {value!r:.80} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    return str(value)


def _traceparent_ok(tp: str) -> bool:
    if len(tp) < 55 or not tp.isascii() or tp[2] != "-" or tp[35] != "-" or tp[52] != "-":
        return False
    hexd = set("0123456789abcdef")
    parts = (tp[0:2], tp[3:35], tp[36:52], tp[53:55])
    if not all(set(p) <= hexd for p in parts) or parts[0] == "ff":
        return False
    if set(parts[1]) == {"0"} or set(parts[2]) == {"0"}:
        return False
    if parts[0] == "00":
        return len(tp) == 55
    return (len(tp) == 55 or tp[55] == "-") and all("\x21" <= c <= "\x7e" for c in tp)


def check_headers(headers: Any) -> List[Tuple[str, str]]:
    """Extra request headers: valid names and values, none of the reserved ones."""
    if headers is None:
        return []
    if not isinstance(headers, Mapping):
        raise InvalidRequestError("invalid_option", f"headers must be a mapping, not {headers!r:.80}")
    out: List[Tuple[str, str]] = []
    for k, v in headers.items():
        if not isinstance(k, str) or not _HEADER_NAME_RE.fullmatch(k):
            raise InvalidRequestError("invalid_header", f"bad header name {k!r:.80}")
        if k.lower() in RESERVED_HEADERS:
            raise InvalidRequestError(
                "invalid_header", f"header {k!r} is set by the client and cannot be replaced "
                "(use key=, idempotency_key=, traceparent= instead)")
        if not isinstance(v, str) or not _HEADER_VALUE_RE.fullmatch(v):
            raise InvalidRequestError(
                "invalid_header", f"header {k!r}: the value must be a str of printable ASCII "
                "without line breaks")
        out.append((k, v))
    return out


def check_number(value: Any, name: str, *, minimum: float = 0.0, allow_zero: bool = False
                 ) -> float:
    """A finite number > minimum (>= when allow_zero); bool is refused."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= minimum if allow_zero else value > minimum))
    if not ok:
        rel = ">=" if allow_zero else ">"
        raise InvalidRequestError("invalid_option", f"{name} must be a number {rel} {minimum}, "
                                  f"not {value!r:.80}")
    return float(value)


def check_count(value: Any, name: str) -> int:
    """An int >= 1 (bool refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError("invalid_option",
                                  f"{name} must be an integer >= 1, not {value!r:.80}")
    return value


def check_ssl_context(value: Any) -> Any:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise InvalidRequestError("invalid_option",
                                  f"ssl_context must be an ssl.SSLContext, not {value!r:.80}")
    return value


def check_backoff(value: Any) -> "Backoff":
    if not isinstance(value, Backoff):
        raise InvalidRequestError("invalid_option",
                                  f"backoff must be a runcast.Backoff, not {value!r:.80}")
    return value


def new_key() -> str:
    """A fresh idempotency key: random, so two publishers never collide."""
    return uuid.uuid4().hex


def json_depth_ok(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True if `value` nests arrays/objects at most `limit` levels (iteratively: a hostile value
    must not blow Python's recursion limit while being checked)."""
    stack: List[Tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            d += 1
            if d > limit:
                return False
            children = v.values() if isinstance(v, dict) else v
            stack.extend((c, d) for c in children)
    return True


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON. NaN/Infinity are not JSON, so they are refused here rather than sent
    as something other clients cannot parse."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidRequestError("invalid_event",
                                  f"event data is not JSON-serializable: {e}") from e


@dataclass(frozen=True)
class Origin:
    """Where a gateway is: scheme, host, port and an optional path prefix (a gateway mounted
    under a path behind an ingress)."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if self.port == default else f"{h}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}{path}"


_BAD_URL_CHARS = re.compile(r'[\x00-\x20\x7f"<>\\^`{|}]')


def parse_origin(url: str) -> Origin:
    if not isinstance(url, str):
        raise InvalidRequestError("invalid_url", f"gateway URL must be a string, not {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # ws:// and wss:// are accepted because users copy the WebSocket URL of the watch page.
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError("invalid_url",
                                  f"gateway URL {url!r} must be http(s)://host[:port][/prefix]")
    if parts.query or parts.fragment:
        raise InvalidRequestError("invalid_url", f"gateway URL {url!r} must not have a query")
    # Checked on the URL as given: urlsplit silently removes tabs and line breaks.
    if _BAD_URL_CHARS.search(url):
        # http.client would raise InvalidURL at the first request, and a space or CR/LF in the
        # host or path would break the request line of the asyncio client.
        raise InvalidRequestError("invalid_url",
                                  f"gateway URL {url!r} has spaces or control characters")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise InvalidRequestError("invalid_url", f"gateway URL {url!r}: {e}") from e
    base = parts.path.rstrip("/")
    # The gateway's own routes start at /v1; a URL that already names one is a common slip.
    if base.endswith("/v1"):
        base = base[:-3]
    return Origin(scheme, parts.hostname, port, base)


def retry_after_seconds(headers: Mapping[str, str], now: Optional[float] = None) -> Optional[float]:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (a random delay in [0, min(cap, base * 2**n)]).

    Full jitter spreads clients that failed at the same moment (a gateway restart) over the
    whole window instead of making them retry in lockstep.
    """

    base: float = 0.1
    cap: float = 5.0

    def __post_init__(self) -> None:
        check_number(self.base, "Backoff.base")
        check_number(self.cap, "Backoff.cap")
        if self.cap < self.base:
            raise InvalidRequestError("invalid_option", f"Backoff.cap ({self.cap}) must be at "
                                      f"least Backoff.base ({self.base})")

    def delay(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        hi = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return (rng or random).uniform(0.0, hi)


#: Publishing: 200 ms doubling to 5 s (a publisher is one client; no need to start faster).
PUBLISH_BACKOFF = Backoff(0.2, 5.0)
#: Subscribing: 100 ms doubling to 5 s, as docs/protocol.md recommends.
SUBSCRIBE_BACKOFF = Backoff(0.1, 5.0)


def lower_headers(pairs: Any) -> Dict[str, str]:
    """Header pairs as a dict with lower-case names (repeated names joined with ', ')."""
    out: Dict[str, str] = {}
    for k, v in pairs:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def progress_data(done: float, total: Optional[float], extra: Dict[str, Any]) -> Dict[str, Any]:
    """The data of a `progress` event: `{"done": d, "total": t}` plus any extra fields."""
    data: Dict[str, Any] = {"done": done}
    if total is not None:
        data["total"] = total
    data.update(extra)
    return data


class AsyncKinds:
    """The event helpers of the async publishers (over HTTP and over NATS). Each is a `publish`
    of a conventional kind and data shape (docs/protocol.md, Run state), written once so both
    publishers send the same events."""

    async def publish(self, kind: str, data: Any) -> int:
        raise NotImplementedError

    async def progress(self, done: float, total: Optional[float] = None, **extra: Any) -> int:
        return await self.publish("progress", progress_data(done, total, extra))

    async def log(self, line: str, **extra: Any) -> int:
        return await self.publish("log", {"line": line, **extra})

    async def status(self, state: str, **extra: Any) -> int:
        return await self.publish("status", {"state": state, **extra})

    async def complete(self, result: Any = None) -> int:
        return await self.publish("complete", {} if result is None else result)

    async def error(self, message: str, **extra: Any) -> int:
        return await self.publish("error", {"message": message, **extra})

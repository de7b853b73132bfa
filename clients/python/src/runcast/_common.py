"""Checks, encoding and retry timing shared by the publishers and the subscriber."""

from __future__ import annotations

import email.utils
import json
import random
import re
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
    except (TypeError, ValueError) as e:
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

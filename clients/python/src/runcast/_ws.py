"""The WebSocket transport of `subscribe(..., transport="ws")`, on the optional `websockets`
package (`pip install runcast[ws]`).

Compared with SSE it renews tokens in-band: on a `refresh` frame it asks `get_token` for a fresh
token and sends it in an `auth` frame, so the connection outlives the token without a reconnect.
Close codes decide between resuming and stopping exactly as docs/protocol.md's table says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Optional

from ._asynchttp import default_ssl_context
from ._common import Origin, lower_headers, retry_after_seconds
from ._errors import (
    ClosedError,
    ForbiddenError,
    ProtocolError,
    RuncastError,
    TransportError,
    error_from_response,
)
from .subscribe import _Conn, _Resume, parse_frame

log = logging.getLogger("runcast")

# Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes": 1000, 1003,
# 1007, 1008, 1009, 1010 and 4400-4999 stop; everything else, including an abnormal end without a
# close frame, resumes).
_FINAL_CLOSE = {1000, 1003, 1007, 1008, 1009, 1010}


def should_resume(code: Optional[int]) -> bool:
    if code is None:
        return True
    if 4000 <= code <= 4399:
        return True
    if 4400 <= code <= 4999:
        return False
    return code not in _FINAL_CLOSE


def _import() -> Any:
    try:
        from websockets.asyncio.client import connect
    except ImportError as e:  # websockets < 13 has no asyncio client; none at all is likelier
        raise ImportError("transport='ws' needs the websockets package (>= 13): "
                          "pip install 'runcast[ws]'") from e
    return connect


class _WSConn(_Conn):
    def __init__(self, ws: Any, run: str,
                 token_for: Callable[[bool], Awaitable[Optional[str]]]) -> None:
        self._ws = ws
        self._run = run
        self._token_for = token_for

    async def frames(self) -> AsyncIterator[Dict[str, Any]]:
        from websockets.exceptions import ConnectionClosed
        while True:
            try:
                # No idle timeout here: the server pings every --heartbeat-interval and the
                # library's own keepalive (ping_timeout) closes a dead connection, which lands
                # in ConnectionClosed below.
                msg = await self._ws.recv()
            except ConnectionClosed as e:
                sent = e.sent.code if e.sent is not None else None
                if sent in (1002, 1007, 1009) and e.rcvd_then_sent is not True:
                    # We closed it: the gateway sent a frame this client refuses (too big for
                    # max_message_bytes, invalid UTF-8, a protocol violation). Reconnecting
                    # would only get the same frame again.
                    reason = e.sent.reason if e.sent is not None else ""
                    raise ProtocolError(f"WebSocket frame refused ({sent}): {reason}") from None
                rcvd = e.rcvd
                code = rcvd.code if rcvd is not None else None
                reason = rcvd.reason if rcvd is not None else "no close frame"
                if code == 4003:
                    raise _Resume("the token expired (4003)", token_expired=True) from None
                if should_resume(code):
                    raise _Resume(f"closed {code}: {reason}") from None
                raise ClosedError(code if code is not None else 1006, reason) from None
            if isinstance(msg, bytes):
                raise ProtocolError("binary WebSocket frame from the gateway")
            frame = parse_frame(msg)
            t = frame["type"]
            if t in ("hello", "pong", "authenticated"):
                continue
            if t == "refresh":
                # Without get_token there is nothing fresher to send: the gateway closes with
                # 4003 at exp and the reconnect reports the expired token as UnauthorizedError.
                try:
                    token = await self._token_for(False)
                except RuncastError as e:
                    # get_token failed (or gave a malformed token): the current token stays
                    # valid until its exp. At exp the gateway closes with 4003 and the
                    # reconnect asks get_token again; only a failure then ends the subscription.
                    log.warning("runcast: get_token failed at a refresh; keeping the current "
                                "token until it expires: %s", e)
                    continue
                if token:
                    try:
                        await self._ws.send(json.dumps({"type": "auth", "token": token}))
                    except ConnectionClosed:
                        continue  # the next recv() reports how it closed
                continue
            if t == "error" and frame.get("code") == "unauthorized" and "run" not in frame:
                # The answer to an `auth` frame whose token the gateway refused. The old token
                # stays valid until its exp; then the close (4003) makes us reconnect with
                # whatever get_token gives, and a 401 there ends the subscription.
                log.warning("runcast: the gateway refused the token from get_token: %s",
                            frame.get("message"))
                continue
            if t == "unsubscribed" and frame.get("run") == self._run:
                # Only the server unsubscribes us unasked: the renewed token no longer covers
                # the run.
                raise ForbiddenError("forbidden", "the renewed token no longer covers this run",
                                     403, None, self._run)
            yield frame

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._ws.close(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass


async def open_ws(origin: Origin, run: str, since: Optional[int], token: Optional[str],
                  ssl_context: Optional[ssl.SSLContext], connect_timeout: float,
                  idle_timeout: float, max_message: int,
                  token_for: Callable[[bool], Awaitable[Optional[str]]]) -> _WSConn:
    connect = _import()
    from websockets.exceptions import (
        ConnectionClosed,
        InvalidHandshake,
        InvalidMessage,
        InvalidStatus,
    )
    scheme = "wss" if origin.tls else "ws"
    uri = f"{scheme}://{origin.host_header}{origin.base_path}/v1/ws"
    kwargs: Dict[str, Any] = {
        "subprotocols": ["runcast.v1"],
        "open_timeout": connect_timeout,
        "max_size": max_message,
        # Replies to the server's pings are automatic; our own pings detect a dead path.
        "ping_interval": max(1.0, idle_timeout / 2),
        "ping_timeout": max(1.0, idle_timeout / 2),
        "close_timeout": 2,
        "compression": None,
        "user_agent_header": "runcast-python",
    }
    if token:
        kwargs["additional_headers"] = {"Authorization": f"Bearer {token}"}
    if origin.tls:
        kwargs["ssl"] = ssl_context or default_ssl_context()
    try:
        ws = await connect(uri, **kwargs)
    except InvalidStatus as e:
        resp = e.response
        headers = lower_headers(resp.headers.raw_items())
        raise error_from_response(resp.status_code, bytes(resp.body or b""),
                                  retry_after_seconds(headers)) from None
    except ssl.SSLError as e:
        raise TransportError(f"TLS to {origin.url('')} failed: {e}") from e
    except InvalidMessage as e:
        # The connection ended during the handshake (a gateway going away): a drop, resumable.
        raise _Resume(f"handshake with {uri} cut: {e}") from e
    except InvalidHandshake as e:
        raise ProtocolError(f"WebSocket handshake with {uri} failed: {e}") from e
    try:
        try:
            first = parse_frame(await asyncio.wait_for(ws.recv(), connect_timeout))
        except ConnectionClosed as e:
            raise _Resume(f"closed before hello: {e}") from None
        if first["type"] != "hello":
            raise ProtocolError(f"first frame is not hello: {first!r:.200}")
        sub: Dict[str, Any] = {"type": "subscribe", "run": run}
        if since is not None:
            sub["since"] = since
        try:
            await ws.send(json.dumps(sub))
        except ConnectionClosed as e:
            raise _Resume(f"closed before subscribe: {e}") from None
    except BaseException:
        await _WSConn(ws, run, token_for).close()
        raise
    return _WSConn(ws, run, token_for)

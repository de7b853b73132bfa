"""A small HTTP/1.1 client on asyncio streams.

Why not aiohttp/httpx: the package has no required dependencies, and the client needs only what
runcast's API uses: one request at a time per connection, Content-Length or chunked or
close-delimited bodies, and a streamed body for SSE. Everything read from the network is bounded
(header lines and total header size, chunk-size lines, buffered bodies), so a broken or hostile
peer gets a `ProtocolError`, never unbounded memory.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Dict, List, Optional, Tuple

from ._common import Origin, lower_headers
from ._errors import ProtocolError

MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096
READ_PIECE = 64 * 1024


class Dropped(ConnectionError):
    """The connection ended before a complete response arrived (no answer, or half of one).

    An OSError, so callers treat it like any other network failure: retry where that is safe.
    """


def default_ssl_context() -> ssl.SSLContext:
    # Verifies the certificate chain and host name against the system's CAs; there is no switch
    # to skip verification (pass a context that trusts your private CA instead).
    return ssl.create_default_context()


class Response:
    """A response head plus a reader for its body."""

    def __init__(self, conn: "Connection", status: int, reason: str,
                 headers: Dict[str, str], framing: str, length: int) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._framing = framing  # "none" | "length" | "chunked" | "close"
        self._left = length      # bytes left: of the body ("length") or of the current chunk
        self._done = framing == "none"
        self._chunk_started = False

    @property
    def complete(self) -> bool:
        return self._done

    async def read_some(self, max_bytes: int = READ_PIECE) -> bytes:
        """Up to `max_bytes` of the body; b"" at its end. Never buffers more than that."""
        if self._done:
            return b""
        r = self._conn.reader
        try:
            if self._framing == "length":
                data = await r.read(min(max_bytes, self._left))
                if not data:
                    raise Dropped(f"connection closed with {self._left} body bytes still to come")
                self._left -= len(data)
                if self._left == 0:
                    self._done = True
                return data
            if self._framing == "close":
                data = await r.read(max_bytes)
                if not data:
                    self._done = True
                    self._conn.reusable = False
                return data
            # chunked
            while self._left == 0:
                if self._chunk_started:
                    await self._expect_crlf()
                size = await self._chunk_size()
                self._chunk_started = True
                if size == 0:
                    await self._skip_trailers()
                    self._done = True
                    return b""
                self._left = size
            data = await r.read(min(max_bytes, self._left))
            if not data:
                raise Dropped("connection closed inside a chunk")
            self._left -= len(data)
            return data
        except asyncio.IncompleteReadError as e:
            raise Dropped("connection closed inside the response body") from e
        except asyncio.LimitOverrunError as e:
            raise ProtocolError("a chunk-size line in the response is too long") from e

    async def read_all(self, limit: int) -> bytes:
        """The whole body, refusing bodies over `limit` bytes."""
        parts: List[bytes] = []
        total = 0
        while True:
            data = await self.read_some()
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                raise ProtocolError(f"response body over {limit} bytes")
            parts.append(data)

    async def _line(self, limit: int) -> bytes:
        line = await self._conn.reader.readuntil(b"\n")
        if len(line) > limit:
            raise ProtocolError("line in the response body framing is too long")
        return line

    async def _chunk_size(self) -> int:
        line = (await self._line(MAX_CHUNK_LINE)).split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
        if size < 0:
            raise ProtocolError(f"bad chunk size {line[:40]!r}")
        return size

    async def _expect_crlf(self) -> None:
        if (await self._line(MAX_CHUNK_LINE)).strip():
            raise ProtocolError("chunk data not followed by CRLF")

    async def _skip_trailers(self) -> None:
        total = 0
        while True:
            line = await self._line(MAX_CHUNK_LINE)
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise ProtocolError("chunked trailers too long")
            if not line.strip():
                return


class Connection:
    """One HTTP/1.1 connection. Not safe for concurrent requests: callers serialize."""

    def __init__(self, origin: Origin, ssl_context: Optional[ssl.SSLContext]) -> None:
        self.origin = origin
        self._ssl = ssl_context
        self.reader: asyncio.StreamReader
        self.writer: Optional[asyncio.StreamWriter] = None
        self.reusable = False
        self.requests = 0

    @property
    def open(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    async def connect(self, timeout: float) -> None:
        ctx = None
        if self.origin.tls:
            ctx = self._ssl or default_ssl_context()
        # `limit` bounds what readuntil() may buffer: a header or chunk line longer than this
        # raises LimitOverrunError instead of growing the buffer.
        coro = asyncio.open_connection(self.origin.host, self.origin.port, ssl=ctx,
                                       server_hostname=self.origin.host if ctx else None,
                                       limit=MAX_HEADER_BYTES)
        self.reader, self.writer = await asyncio.wait_for(coro, timeout)
        self.reusable = True
        self.requests = 0

    async def send(self, method: str, target: str, headers: List[Tuple[str, str]],
                   body: Optional[bytes]) -> None:
        if self.writer is None:
            raise Dropped("the connection is closed")
        lines = [f"{method} {self.origin.base_path}{target} HTTP/1.1",
                 f"Host: {self.origin.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.writer.write(head + (body or b""))
        self.requests += 1
        await self.writer.drain()

    async def read_head(self, method: str) -> Response:
        while True:
            status, reason, headers = await self._read_head_once()
            # Interim 1xx answers (100 Continue, 103 Early Hints) precede the real one.
            if 100 <= status < 200 and status != 101:
                continue
            break
        conn_hdr = headers.get("connection", "").lower()
        if "close" in conn_hdr:
            self.reusable = False
        te = headers.get("transfer-encoding")
        if method == "HEAD" or status in (101, 204, 304):
            return Response(self, status, reason, headers, "none", 0)
        if te is not None:
            if te.lower().split(",")[-1].strip() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {te!r}")
            return Response(self, status, reason, headers, "chunked", 0)
        cl = headers.get("content-length")
        if cl is not None:
            values = {v.strip() for v in cl.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise ProtocolError(f"bad Content-Length {cl!r}")
            n = int(next(iter(values)))
            return Response(self, status, reason, headers, "length" if n else "none", n)
        self.reusable = False
        return Response(self, status, reason, headers, "close", 0)

    async def _read_head_once(self) -> Tuple[int, str, Dict[str, str]]:
        total = 0
        lines: List[bytes] = []
        try:
            while True:
                line = await self.reader.readuntil(b"\n")
                total += len(line)
                if total > MAX_HEADER_BYTES:
                    raise ProtocolError(f"response headers over {MAX_HEADER_BYTES} bytes")
                if line in (b"\r\n", b"\n"):
                    if lines:
                        break
                    continue  # tolerate stray blank lines before the status line
                lines.append(line.rstrip(b"\r\n"))
        except asyncio.IncompleteReadError as e:
            if not lines and not e.partial:
                raise Dropped("the connection closed without an answer") from e
            raise Dropped("the connection closed inside the response headers") from e
        except asyncio.LimitOverrunError as e:
            raise ProtocolError("a response header line is too long") from e
        status_line = lines[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() \
                or len(parts[1]) != 3:
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        pairs = []
        for raw in lines[1:]:
            text = raw.decode("latin-1")
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"malformed response header line {text[:80]!r}")
            pairs.append((name, value.strip()))
        return int(parts[1]), parts[2] if len(parts) > 2 else "", lower_headers(pairs)

    def abort(self) -> None:
        """Closes the connection at once, without waiting (safe in a cancelled task): whatever
        is buffered or still in flight is thrown away and the connection is never reused."""
        w, self.writer = self.writer, None
        self.reusable = False
        if w is not None:
            w.transport.abort()

    async def close(self) -> None:
        w, self.writer = self.writer, None
        self.reusable = False
        if w is None:
            return
        w.close()
        try:
            # Bounded: a TLS close_notify exchange with a dead peer must not hang the caller.
            await asyncio.wait_for(w.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass

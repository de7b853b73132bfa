"""A small HTTP/1.1 client on raw sockets, so every status, header and body byte is visible.

Used for plain requests (`request`) and for streaming responses such as SSE (`open_stream`).
Only what the suite needs: Content-Length and chunked bodies, optional TLS.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit


class HTTPError(Exception):
    pass


@dataclass
class Response:
    status: int
    reason: str
    headers: list  # list of (name, value), names as sent
    body: bytes = b""
    version: str = "HTTP/1.1"

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def error(self):
        """The documented error body {"error":{"code","message"}}; asserts its shape."""
        try:
            doc = json.loads(self.body)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(
                f"HTTP {self.status} body is not JSON ({e}): {self.body[:300]!r}"
            ) from None
        assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), (
            f"HTTP {self.status} body is not {{\"error\":{{...}}}}: {doc!r}"
        )
        err = doc["error"]
        assert isinstance(err.get("code"), str), f"error.code missing or not a string: {doc!r}"
        assert isinstance(err.get("message"), str) and err["message"], (
            f"error.message missing or empty: {doc!r}"
        )
        return err

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:200]!r}>"


def split_base(base: str):
    u = urlsplit(base)
    tls = u.scheme in ("https", "wss")
    port = u.port or (443 if tls else 80)
    return u.hostname, port, tls


def connect(base: str, timeout: float = 10.0, ssl_context: Optional[ssl.SSLContext] = None,
            rcvbuf: Optional[int] = None) -> socket.socket:
    host, port, tls = split_base(base)
    if rcvbuf is not None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect((host, port))
    else:
        s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl_context or ssl.create_default_context()
        s = ctx.wrap_socket(s, server_hostname=host)
    s.settimeout(timeout)
    return s


def build_request(method: str, host_header: str, path: str, headers: Optional[Iterable] = None,
                  body: Optional[bytes] = None, content_length: Optional[int] = None) -> bytes:
    hdrs = list(headers.items() if isinstance(headers, dict) else (headers or []))
    names = {k.lower() for k, _ in hdrs}
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}"] if "host" not in names else [
        f"{method} {path} HTTP/1.1"]
    for k, v in hdrs:
        lines.append(f"{k}: {v}")
    if "content-length" not in names and "transfer-encoding" not in names:
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        elif body is not None:
            lines.append(f"Content-Length: {len(body)}")
    if "connection" not in names:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


class _Reader:
    def __init__(self, sock: socket.socket, buf: bytes = b""):
        self.sock = sock
        self.buf = buf
        self.eof = False

    def fill(self, timeout: Optional[float] = None) -> bool:
        """Read more bytes; False at EOF. Raises socket.timeout."""
        if self.eof:
            return False
        if timeout is not None:
            self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, OSError) as e:
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out waiting for " + repr(marker))
            if not self.fill(left):
                raise HTTPError(f"connection closed before {marker!r}; got {self.buf[:300]!r}")
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out reading body")
            if not self.fill(left):
                raise HTTPError(f"connection closed after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def parse_head(raw: bytes):
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HTTPError(f"bad status line {status_line!r}")
    version, status = parts[0], int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return version, status, reason, headers


class StreamResponse(Response):
    """A response whose body is read incrementally (chunked or not)."""

    def __init__(self, sock, reader, version, status, reason, headers, method="GET"):
        super().__init__(status, reason, headers, b"", version)
        self.sock = sock
        self.reader = reader
        te = (self.header("transfer-encoding") or "").lower()
        self.chunked = "chunked" in te
        cl = self.header("content-length")
        self.remaining = int(cl) if (cl is not None and not self.chunked) else None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self.remaining = 0
        self._chunk_left = 0
        self._chunk_state = "size"  # size | data | data_crlf | trailer | done
        self.done = self.remaining == 0

    def read_some(self, timeout: float) -> bytes:
        """Up to a chunk of decoded body bytes; b"" at end of body. Raises socket.timeout."""
        deadline = time.monotonic() + timeout
        r = self.reader
        if self.done:
            return b""
        if not self.chunked:
            if not r.buf:
                if not r.fill(timeout):
                    self.done = True
                    return b""
            data = r.buf
            if self.remaining is not None:
                data = data[: self.remaining]
                self.remaining -= len(data)
                if self.remaining == 0:
                    self.done = True
            r.buf = r.buf[len(data):]
            return data
        while True:
            if self._chunk_state == "size":
                try:
                    line = r.read_until(b"\r\n", deadline)
                except HTTPError:
                    self.done = True  # connection ended mid-stream
                    return b""
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self._chunk_state = "trailer"
                    continue
                self._chunk_left = size
                self._chunk_state = "data"
            elif self._chunk_state == "data":
                if not r.buf:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("timed out")
                    if not r.fill(left):
                        self.done = True
                        return b""
                data = r.buf[: self._chunk_left]
                r.buf = r.buf[len(data):]
                self._chunk_left -= len(data)
                if self._chunk_left == 0:
                    self._chunk_state = "data_crlf"
                return data
            elif self._chunk_state == "data_crlf":
                try:
                    r.read_exact(2, deadline)
                except HTTPError:
                    self.done = True
                    return b""
                self._chunk_state = "size"
            elif self._chunk_state == "trailer":
                try:
                    while True:
                        line = r.read_until(b"\r\n", deadline)
                        if line == b"\r\n":
                            break
                except HTTPError:
                    pass
                self.done = True
                return b""

    def read_all(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        out = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("body not complete in time")
            chunk = self.read_some(left)
            if not chunk and self.done:
                break
            out += chunk
        self.body = out
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def open_stream(base: str, method: str, path: str, headers=None, body: Optional[bytes] = None,
                timeout: float = 10.0, ssl_context=None, rcvbuf=None) -> StreamResponse:
    host, port, _ = split_base(base)
    sock = connect(base, timeout, ssl_context, rcvbuf=rcvbuf)
    sock.sendall(build_request(method, f"{host}:{port}", path, headers, body))
    reader = _Reader(sock)
    deadline = time.monotonic() + timeout
    head = reader.read_until(b"\r\n\r\n", deadline)
    version, status, reason, hdrs = parse_head(head)
    return StreamResponse(sock, reader, version, status, reason, hdrs, method)


def request(base: str, method: str, path: str, body=None, headers=None, timeout: float = 10.0,
            ssl_context=None) -> Response:
    """One request on a fresh connection; returns the full response."""
    if body is not None and not isinstance(body, (bytes, bytearray)):
        if isinstance(body, str):
            body = body.encode("utf-8")
        else:
            body = json.dumps(body).encode("utf-8")
            hdrs = dict(headers or {})
            if not any(k.lower() == "content-type" for k in hdrs):
                hdrs["Content-Type"] = "application/json"
            headers = hdrs
    resp = open_stream(base, method, path, headers, body, timeout, ssl_context)
    try:
        resp.read_all(timeout)
    finally:
        resp.close()
    return Response(resp.status, resp.reason, resp.headers, resp.body, resp.version)


def get(base, path, **kw) -> Response:
    return request(base, "GET", path, **kw)


def post(base, path, body=None, **kw) -> Response:
    return request(base, "POST", path, body=body, **kw)

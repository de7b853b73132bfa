"""A minimal RFC 6455 WebSocket client on raw sockets.

Written for the suite so that a refused upgrade shows its HTTP status, headers and body, close
codes are visible exactly, server pings can be observed (and answered or not), and the client can
misbehave on purpose (binary frames, oversized frames, silence, not reading).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Optional

import httpc

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeRejected(Exception):
    def __init__(self, status, headers, body):
        super().__init__(f"upgrade refused: HTTP {status} {body[:300]!r}")
        self.status = status
        self.headers = headers
        self.body = body
        self.response = httpc.Response(status, "", headers, body)


class Closed(Exception):
    """The server closed the connection (code None: no close frame, just EOF/reset)."""

    def __init__(self, code, reason=""):
        super().__init__(f"connection closed: code={code} reason={reason!r}")
        self.code = code
        self.reason = reason


class Timeout(Exception):
    pass


@dataclass
class Msg:
    kind: str  # text | binary | close | ping | pong | eof
    data: bytes = b""
    code: Optional[int] = None
    reason: str = ""

    @property
    def text(self):
        return self.data.decode("utf-8")


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    rep = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(rep, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, length_override=None) -> bytes:
    n = len(payload) if length_override is None else length_override
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WS:
    def __init__(self, sock, reader_buf: bytes, response_headers, auto_pong=True):
        self.sock = sock
        self.buf = reader_buf
        self.response_headers = response_headers
        self.auto_pong = auto_pong
        self.pings = []  # monotonic times of server pings
        self.closed: Optional[Closed] = None
        self._frag_op = None
        self._frag = b""
        self.backlog = []  # parsed frames set aside (other runs' frames while awaiting a state)

    # ------------------------------------------------------------------ connect
    @classmethod
    def connect(cls, base: str, path: str = "/v1/ws", headers=None, subprotocols=None,
                timeout: float = 10.0, auto_pong: bool = True, ssl_context=None, rcvbuf=None,
                upgrade_headers=True) -> "WS":
        host, port, _ = httpc.split_base(base)
        sock = httpc.connect(base, timeout, ssl_context, rcvbuf=rcvbuf)
        key = base64.b64encode(os.urandom(16)).decode()
        hdrs = []
        if upgrade_headers:
            hdrs += [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
        if subprotocols:
            hdrs.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
        hdrs += list(headers.items() if isinstance(headers, dict) else (headers or []))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in hdrs]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reader = httpc._Reader(sock)
        deadline = time.monotonic() + timeout
        head = reader.read_until(b"\r\n\r\n", deadline)
        version, status, reason, rh = httpc.parse_head(head)
        resp = httpc.Response(status, reason, rh)
        if status != 101:
            body = reader.buf
            cl = resp.header("content-length")
            try:
                if cl is not None:
                    body = reader.read_exact(int(cl), deadline)
                elif "chunked" in (resp.header("transfer-encoding") or "").lower():
                    sr = httpc.StreamResponse(sock, reader, version, status, reason, rh)
                    body = sr.read_all(max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001
                pass
            sock.close()
            raise HandshakeRejected(status, rh, body)
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        got = resp.header("sec-websocket-accept")
        if got != accept:
            sock.close()
            raise AssertionError(f"bad Sec-WebSocket-Accept {got!r} (expected {accept!r})")
        return cls(sock, reader.buf, rh, auto_pong)

    def header(self, name):
        return httpc.Response(101, "", self.response_headers).header(name)

    # ------------------------------------------------------------------ sending
    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload: bytes, fin=True):
        self.sock.sendall(encode_frame(opcode, payload, fin))

    def send_text(self, text):
        if isinstance(text, str):
            text = text.encode("utf-8")
        self.send_frame(0x1, text)

    def send_json(self, obj):
        self.send_text(json.dumps(obj))

    def send_binary(self, data: bytes):
        self.send_frame(0x2, data)

    def send_close(self, code=1000, reason=""):
        try:
            self.send_frame(0x8, struct.pack("!H", code) + reason.encode())
        except OSError:
            pass

    def close(self, code=1000):
        self.send_close(code)
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                m = self.recv(max(0.01, deadline - time.monotonic()))
                if m.kind in ("close", "eof"):
                    break
        except Exception:  # noqa: BLE001
            pass
        self.abort()

    def abort(self):
        """Cut the connection without a close handshake (a dropped network)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ receiving
    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout("no frame in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(262144)
        except (socket.timeout, TimeoutError):
            raise Timeout("no frame in time") from None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _need(self, n, deadline):
        while len(self.buf) < n:
            if not self._fill(deadline):
                return False
        return True

    def recv_frame(self, timeout: float):
        """One raw frame (fin, opcode, payload), or None at EOF."""
        deadline = time.monotonic() + timeout
        if not self._need(2, deadline):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        off = 2
        if n == 126:
            if not self._need(4, deadline):
                return None
            n = struct.unpack("!H", self.buf[2:4])[0]
            off = 4
        elif n == 127:
            if not self._need(10, deadline):
                return None
            n = struct.unpack("!Q", self.buf[2:10])[0]
            off = 10
        if masked:
            raise AssertionError("server sent a masked frame (RFC 6455 5.1 forbids it)")
        if not self._need(off + n, deadline):
            return None
        payload = self.buf[off: off + n]
        self.buf = self.buf[off + n:]
        return fin, opcode, payload

    def recv(self, timeout: float = 5.0) -> Msg:
        """The next message or control frame. Pings are answered when auto_pong is on."""
        deadline = time.monotonic() + timeout
        while True:
            if self.closed is not None:
                return Msg("close", code=self.closed.code, reason=self.closed.reason)
            fr = self.recv_frame(max(0.0, deadline - time.monotonic()) or 0.0001)
            if fr is None:
                self.closed = Closed(None, "eof")
                return Msg("eof")
            fin, op, payload = fr
            if op == 0x9:
                self.pings.append(time.monotonic())
                if self.auto_pong:
                    try:
                        self.send_frame(0xA, payload)
                    except OSError:
                        pass
                return Msg("ping", payload)
            if op == 0xA:
                return Msg("pong", payload)
            if op == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                self.closed = Closed(code, reason)
                try:
                    self.send_frame(0x8, payload[:2])
                except OSError:
                    pass
                return Msg("close", payload, code, reason)
            if op in (0x1, 0x2):
                if fin:
                    return Msg("text" if op == 1 else "binary", payload)
                self._frag_op, self._frag = op, payload
                continue
            if op == 0x0:
                self._frag += payload
                if fin:
                    kind = "text" if self._frag_op == 1 else "binary"
                    data, self._frag, self._frag_op = self._frag, b"", None
                    return Msg(kind, data)
                continue
            raise AssertionError(f"unknown opcode {op}")

    def recv_text(self, timeout: float = 5.0) -> str:
        """The next text message (skipping control frames); raises Closed / Timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("no text frame in time")
            m = self.recv(left)
            if m.kind == "text":
                return m.text
            if m.kind in ("close", "eof"):
                raise Closed(m.code, m.reason)
            if m.kind == "binary":
                raise AssertionError(f"server sent a binary frame: {m.data[:100]!r}")

    def recv_json(self, timeout: float = 5.0):
        if self.backlog:
            return self.backlog.pop(0)
        return json.loads(self.recv_text(timeout))

    def expect(self, type_, timeout: float = 5.0, skip=()):
        """The next frame, asserting its type (frames whose type is in `skip` are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_json(max(0.001, deadline - time.monotonic()))
            if f.get("type") in skip:
                continue
            assert f.get("type") == type_, f"expected a {type_!r} frame, got {f!r}"
            return f

    def wait_close(self, timeout: float = 5.0) -> Closed:
        """Read (and drop) frames until the server closes; returns the Closed (code None = EOF)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("server did not close in time")
            m = self.recv(left)
            if m.kind == "close":
                return Closed(m.code, m.reason)
            if m.kind == "eof":
                return Closed(None, "eof")

    def assert_quiet(self, seconds: float, allow=("ping", "pong")):
        """No data frame arrives for `seconds` (control frames allowed)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                m = self.recv(left)
            except Timeout:
                return
            if m.kind in allow:
                continue
            raise AssertionError(f"expected silence, got {m.kind}: {m.data[:300]!r} code={m.code}")

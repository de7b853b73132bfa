"""A minimal NATS client (core protocol over a raw socket), enough to act as a worker:
core publish (like `nats pub`), JetStream publish with ack (PUB with a reply inbox), headers
(HPUB: Nats-Msg-Id, traceparent) and reading a KV key through the JetStream API.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time


class NatsError(Exception):
    pass


class Nats:
    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.sid = 0
        info = self._line(time.monotonic() + timeout)
        if not info.startswith(b"INFO "):
            raise NatsError(f"expected INFO, got {info!r}")
        self.info = json.loads(info[5:])
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                   "protocol": 1, "name": "runcast-conformance", "lang": "python", "version": "0"}
        self.sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        self._wait_pong(time.monotonic() + timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("NATS: timed out")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise NatsError("NATS connection closed")
        self.buf += chunk

    def _line(self, deadline) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n, deadline) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _wait_pong(self, deadline):
        while True:
            line = self._line(deadline)
            if line == b"PONG":
                return
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise NatsError(line.decode())

    def flush(self, timeout=5.0):
        self.sock.sendall(b"PING\r\n")
        self._wait_pong(time.monotonic() + timeout)

    @staticmethod
    def _headers_block(headers: dict) -> bytes:
        out = b"NATS/1.0\r\n"
        for k, v in headers.items():
            out += f"{k}: {v}\r\n".encode()
        return out + b"\r\n"

    def publish(self, subject: str, payload: bytes, headers: dict | None = None,
                reply: str | None = None):
        r = f" {reply}" if reply else ""
        if headers:
            hb = self._headers_block(headers)
            cmd = f"HPUB {subject}{r} {len(hb)} {len(hb) + len(payload)}\r\n".encode()
            self.sock.sendall(cmd + hb + payload + b"\r\n")
        else:
            cmd = f"PUB {subject}{r} {len(payload)}\r\n".encode()
            self.sock.sendall(cmd + payload + b"\r\n")

    def request(self, subject: str, payload: bytes, headers: dict | None = None,
                timeout: float = 5.0):
        """Returns (headers_text, payload) of the first reply."""
        self.sid += 1
        sid = str(self.sid)
        inbox = "_INBOX." + os.urandom(8).hex()
        self.sock.sendall(f"SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\n".encode())
        self.publish(subject, payload, headers, reply=inbox)
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            if line in (b"PONG", b"+OK"):
                continue
            if line.startswith(b"-ERR"):
                raise NatsError(line.decode())
            parts = line.split()
            if parts[0] == b"MSG":
                n = int(parts[-1])
                data = self._exact(n + 2, deadline)[:-2]
                if parts[2].decode() == sid:
                    return "", data
            elif parts[0] == b"HMSG":
                hlen, total = int(parts[-2]), int(parts[-1])
                data = self._exact(total + 2, deadline)[:-2]
                if parts[2].decode() == sid:
                    hdr = data[:hlen].decode("utf-8", "replace")
                    if " 503" in hdr.split("\r\n")[0]:
                        raise NatsError("no responders for " + subject)
                    return hdr, data[hlen:]

    def js_publish(self, subject: str, payload: bytes, headers: dict | None = None,
                   timeout: float = 5.0) -> dict:
        _, data = self.request(subject, payload, headers, timeout)
        ack = json.loads(data)
        if "error" in ack:
            raise NatsError(f"JetStream publish refused: {ack}")
        return ack

    def kv_get(self, bucket: str, key: str, timeout: float = 5.0):
        """The latest value of a KV key as bytes, or None if absent."""
        body = json.dumps({"last_by_subj": f"$KV.{bucket}.{key}"}).encode()
        _, data = self.request(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", body, timeout=timeout)
        doc = json.loads(data)
        if "error" in doc:
            return None
        return base64.b64decode(doc["message"].get("data", ""))

    def stream_info(self, stream: str, timeout: float = 5.0) -> dict:
        _, data = self.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
        return json.loads(data)

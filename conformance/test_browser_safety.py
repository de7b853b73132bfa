"""docs/security.md "Browser safety": --allowed-origin and CORS."""

import pytest

import httpc
from conftest import ORIGIN
from harness import assert_error, log, open_sse, publish_ok, uid, ws
from wsclient import WS, HandshakeRejected

EVIL = "https://evil.example"


def test_foreign_origin_websocket_is_403_before_upgrade(origin_dep):
    with pytest.raises(HandshakeRejected) as ei:
        WS.connect(origin_dep.a.url, headers={"Origin": EVIL})
    assert ei.value.status == 403, ei.value
    assert_error(ei.value.response, 403, "forbidden")


def test_allowed_origin_and_no_origin_websockets_work(origin_dep):
    for h in ({"Origin": ORIGIN}, {}):
        c = ws(origin_dep.a, headers=h)
        c.close()


def test_cors_headers_for_allowed_origin_only(origin_dep):
    run = uid()
    publish_ok(origin_dep.a, run, log("x"))
    for path in (f"/v1/runs/{run}", f"/v1/runs/{run}/events", "/v1/runs"):
        r = httpc.get(origin_dep.a.url, path, headers={"Origin": ORIGIN})
        assert r.status == 200
        assert r.header("access-control-allow-origin") == ORIGIN, (path, r.headers)
        r = httpc.get(origin_dep.a.url, path, headers={"Origin": EVIL})
        assert r.header("access-control-allow-origin") in (None, ""), (path, r.headers)
        assert r.header("access-control-allow-origin") != "*"
    st = open_sse(origin_dep.a, run, headers={"Origin": ORIGIN})
    assert st.status == 200
    assert st.header("access-control-allow-origin") == ORIGIN, st.resp.headers
    st.close()


@pytest.mark.parametrize("path,method", [("/v1/runs/r1/events", "POST"), ("/v1/runs/r1/stream", "GET"),
                                         ("/v1/runs/r1", "GET")])
def test_preflight_allows_documented_headers(origin_dep, path, method):
    want = ["authorization", "content-type", "x-runcast-key", "last-event-id", "traceparent"]
    r = httpc.request(origin_dep.a.url, "OPTIONS", path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": ", ".join(want)})
    assert 200 <= r.status < 300, r
    assert r.header("access-control-allow-origin") == ORIGIN, r.headers
    allowed = {h.strip().lower() for h in (r.header("access-control-allow-headers") or "").split(",")}
    assert set(want) <= allowed or "*" in allowed, f"Allow-Headers {allowed} lacks {set(want) - allowed}"
    methods = {m.strip().upper() for m in (r.header("access-control-allow-methods") or "").split(",")}
    assert method in methods or "*" in methods, methods


def test_no_cors_and_any_origin_by_default(dep):
    """Without --allowed-origin: any origin may open WebSockets, and there is no CORS."""
    c = ws(dep.a, headers={"Origin": EVIL})
    c.close()
    r = httpc.get(dep.a.url, "/v1/runs", headers={"Origin": EVIL})
    assert r.status == 200
    assert r.header("access-control-allow-origin") is None, r.headers

"""README: "A gateway whose NATS is unreachable still starts. /readyz says why it is not ready";
error code `unavailable` (503, with Retry-After)."""

import pytest

import httpc
from conftest import KINDS
from harness import assert_error, free_port, log, publish, uid, wait_until


@pytest.fixture(scope="module")
def orphan(launcher):
    if "nats" not in KINDS:
        pytest.skip("NATS only")
    from harness import Gateway, runcast_bin
    port = free_port()  # nothing listens here
    gw = Gateway([runcast_bin(), "gateway", "--nats", f"nats://127.0.0.1:{port}", "--allow-anonymous",
                  "--allow-anonymous-publish", "--drain-timeout", "2s"], launcher.workdir, "orphan",
                 wait=False)
    launcher.started.append(gw)
    wait_until(lambda: httpc.get(gw.url, "/healthz", timeout=1).status == 200, 15,
               what="gateway without NATS serves /healthz")
    yield gw
    gw.stop()


def test_readyz_says_why_not_ready(orphan):
    r = httpc.get(orphan.url, "/readyz")
    assert r.status == 503, r
    assert r.body.strip() and r.text.strip() != "ready", r
    assert r.header("retry-after") is not None, f"503 responses carry Retry-After: {r.headers}"


def test_publish_and_reads_are_503_unavailable(orphan):
    for resp in (publish(orphan, uid(), log("x"), timeout=15),
                 httpc.get(orphan.url, f"/v1/runs/{uid()}", timeout=15),
                 httpc.get(orphan.url, f"/v1/runs/{uid()}/events", timeout=15),
                 httpc.get(orphan.url, "/v1/runs", timeout=15)):
        assert_error(resp, 503, "unavailable")
        assert resp.header("retry-after") is not None, resp.headers

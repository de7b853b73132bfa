"""docs/security.md "Publisher API keys"."""

import hashlib
import subprocess
import time

import pytest

import httpc
from conftest import KINDS
from harness import assert_error, clean_env, log, publish, runcast_bin, uid


def test_publish_key_prints_key_and_entry_with_its_sha256(publish_key):
    key, entry = publish_key["key"], publish_key["entry"]
    assert key and entry, publish_key["output"]
    name, digest, prefixes = entry.split(":", 2)
    assert name == "ci"
    assert prefixes == "build-|test-", entry
    assert digest == hashlib.sha256(key.encode()).hexdigest(), "gateways store the SHA-256 of the key"


def test_publish_key_without_prefixes_covers_any_run():
    out = subprocess.run([runcast_bin(), "publish-key", "any"], capture_output=True, text=True,
                         timeout=20, env=clean_env())
    assert out.returncode == 0, out.stderr
    import conftest
    pk = conftest.parse_publish_key_output(out.stdout)
    assert pk["entry"] and pk["entry"].startswith("any:"), out.stdout


def test_no_key_is_401(pubkey_dep):
    assert_error(publish(pubkey_dep.a, "build-" + uid(), log("x")), 401, "unauthorized")


def test_unknown_key_is_401(pubkey_dep):
    r = publish(pubkey_dep.a, "build-" + uid(), log("x"), headers={"X-Runcast-Key": "nope" * 8})
    assert_error(r, 401, "unauthorized")
    r = publish(pubkey_dep.a, "build-" + uid(), log("x"), headers={"Authorization": "Bearer " + "nope" * 8})
    assert_error(r, 401, "unauthorized")


@pytest.mark.parametrize("how", ["x-runcast-key", "authorization"])
def test_key_in_prefix_publishes(pubkey_dep, publish_key, how):
    h = ({"X-Runcast-Key": publish_key["key"]} if how == "x-runcast-key"
         else {"Authorization": "Bearer " + publish_key["key"]})
    for run in ("build-" + uid(), "test-" + uid()):
        r = publish(pubkey_dep.a, run, log("x"), headers=h)
        assert r.status == 200, r


def test_run_outside_the_key_prefixes_is_403(pubkey_dep, publish_key):
    h = {"X-Runcast-Key": publish_key["key"]}
    for run in ("deploy-" + uid(), "buil-" + uid(), "Build-" + uid()):
        assert_error(publish(pubkey_dep.a, run, log("x"), headers=h), 403, "forbidden")


def test_body_over_max_publish_with_key_is_413(pubkey_dep, publish_key):
    h = {"X-Runcast-Key": publish_key["key"]}
    r = publish(pubkey_dep.a, "build-" + uid(), {"kind": "log", "data": "x" * 5000}, headers=h)
    assert_error(r, 413, "too_large")


def test_key_is_checked_before_the_body_is_read(pubkey_dep):
    """Headers announcing a body that never comes: no key must be answered 401 at once."""
    gw = pubkey_dep.a
    s = httpc.connect(gw.url, 5)
    s.sendall(("POST /v1/runs/build-x/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               "Content-Length: 3000\r\n\r\n").encode())
    t0 = time.monotonic()
    r = httpc._Reader(s)
    head = r.read_until(b"\r\n\r\n", time.monotonic() + 5)
    status = httpc.parse_head(head)[1]
    s.close()
    assert status == 401, head
    assert time.monotonic() - t0 < 3


def test_runcast_publish_with_key(pubkey_dep, publish_key):
    run = "build-" + uid()
    out = subprocess.run([runcast_bin(), "publish", run, "--kind", "progress", "--data",
                          '{"done":3,"total":10}', "--url", pubkey_dep.a.url, "--key",
                          publish_key["key"]], capture_output=True, text=True, timeout=20,
                         env=clean_env())
    assert out.returncode == 0, out.stderr
    r = httpc.get(pubkey_dep.a.url, f"/v1/runs/{run}/events")
    assert r.status == 200 and r.json()["events"][0]["data"] == {"done": 3, "total": 10}, r
    out = subprocess.run([runcast_bin(), "publish", run, "--data", "1", "--url", pubkey_dep.a.url],
                         capture_output=True, text=True, timeout=20, env=clean_env())
    assert out.returncode != 0, "publishing without the key must fail"


@pytest.fixture(scope="module", params=KINDS)
def rate_key_dep(request, launcher, publish_key):
    d = launcher.deploy(request.param, ["--publish-key", publish_key["entry"],
                                        "--publish-rate-per-key", "1"], n=1, anon_publish=False)
    yield d
    d.stop()


def test_publish_rate_per_key_is_429_with_retry_after(rate_key_dep, publish_key):
    h = {"X-Runcast-Key": publish_key["key"]}
    results = [publish(rate_key_dep.a, "build-" + uid(), log("x"), headers=h) for _ in range(6)]
    assert results[0].status == 200 and results[1].status == 200, "burst is twice the rate (2)"
    limited = [r for r in results if r.status == 429]
    assert limited, f"no 429 in 6 rapid publishes at 1/s: {[r.status for r in results]}"
    r = limited[0]
    assert_error(r, 429, "rate_limited")
    ra = r.header("retry-after")
    assert ra is not None and ra.strip().isdigit(), f"429 needs Retry-After: {r.headers}"


def test_gateway_without_keys_refuses_http_publishes_naming_both_options(launcher):
    if "nats" not in KINDS:
        pytest.skip("needs runcast gateway (NATS)")
    gw = launcher.gateway("nats", anon_publish=False)
    try:
        r = publish(gw, uid(), log("x"))
        err = assert_error(r, 401, "unauthorized")
        assert "--publish-key" in err["message"] and "--allow-anonymous-publish" in err["message"], err
    finally:
        gw.stop()


def test_runcast_up_without_keys_is_open(launcher):
    if "embedded" not in KINDS:
        pytest.skip("embedded only")
    gw = launcher.gateway("embedded", anon_publish=False)
    try:
        r = publish(gw, uid(), log("x"))
        assert r.status == 200, r
    finally:
        gw.stop()


def test_keys_never_reach_metrics_or_logs(pubkey_dep, publish_key):
    gw = pubkey_dep.a
    publish(gw, "build-" + uid(), log("x"), headers={"X-Runcast-Key": publish_key["key"]})
    publish(gw, "deploy-" + uid(), log("x"), headers={"Authorization": "Bearer " + publish_key["key"]})
    publish(gw, "build-" + uid(), log("x"), headers={"X-Runcast-Key": "wrong-key-marker-123"})
    time.sleep(0.3)
    metrics = httpc.get(gw.url, "/metrics").text
    logs = gw.proc.log_tail(10_000_000)
    for k in (publish_key["key"], "wrong-key-marker-123"):
        assert k not in metrics and k not in logs, "a publish key reached /metrics or the log"

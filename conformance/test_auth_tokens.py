"""docs/security.md "Subscriber tokens" and docs/protocol.md "Authentication": the token matrix,
the three ways to present a token, and runs / run_prefixes scoping on WebSocket, SSE and HTTP reads.
"""

import time

import jwt as pyjwt
import pytest

import httpc
import schema
import tokens
from conftest import AUDIENCE, SECRET
from harness import (assert_error, collect_events, expect_error_frame, log, open_sse,
                     publish_ok, subscribe, uid, wait_until)
from tokens import DROP, alg_none, bad_signature, bearer, hs256
from wsclient import WS, HandshakeRejected


def _now():
    return int(time.time())


MATRIX = {
    "valid": (lambda: hs256(), True),
    "nbf_past": (lambda: hs256(nbf=_now() - 30), True),
    "aud_array_with_ours": (lambda: hs256(aud=["other", AUDIENCE]), True),
    "expired": (lambda: hs256(exp=_now() - 3600), False),
    "nbf_future": (lambda: hs256(nbf=_now() + 3600), False),
    "bad_signature": (lambda: bad_signature(), False),
    "wrong_key": (lambda: hs256(secret="another-secret-that-is-32-bytes-long!!"), False),
    "alg_none": (lambda: alg_none(), False),
    "hs384_same_secret": (lambda: pyjwt.encode(tokens.claims(), SECRET.encode(), algorithm="HS384"), False),
    "missing_exp": (lambda: hs256(exp=DROP), False),
    "exp_not_a_number": (lambda: hs256(exp="tomorrow"), False),
    "aud_missing": (lambda: hs256(aud=DROP), False),
    "aud_wrong": (lambda: hs256(aud="other"), False),
    "aud_array_without_ours": (lambda: hs256(aud=["a", "b"]), False),
    "iss_missing": (lambda: hs256(iss=DROP), False),
    "iss_wrong": (lambda: hs256(iss="https://evil.example"), False),
    "garbage": (lambda: "not.a.jwt", False),
    "two_parts": (lambda: hs256().rsplit(".", 1)[0], False),
}


@pytest.fixture(scope="module")
def auth_run(auth_dep):
    run = uid("auth")
    publish_ok(auth_dep.a, run, [log("one"), log("two")])
    return run


def ws_try(gw, token, via="header", scheme="Bearer", path="/v1/ws"):
    """Returns the open WS (hello read) or raises HandshakeRejected."""
    headers, protos = {}, None
    if via == "header":
        headers = bearer(token, scheme)
    elif via == "subprotocol":
        protos = ["runcast.v1", "runcast.bearer." + token]
    elif via == "query":
        path = path + "?access_token=" + token
    c = WS.connect(gw.url, path=path, headers=headers, subprotocols=protos)
    c.hello = c.recv_json(5)
    assert c.hello["type"] == "hello", c.hello
    return c


def _expect_401(resp_or_exc):
    r = resp_or_exc.response if isinstance(resp_or_exc, HandshakeRejected) else resp_or_exc
    assert_error(r, 401, "unauthorized")


@pytest.mark.parametrize("case", list(MATRIX))
@pytest.mark.parametrize("surface", ["ws", "sse", "http"])
def test_token_matrix(auth_dep, auth_run, case, surface):
    make, ok = MATRIX[case]
    token = make()
    gw = auth_dep.b
    if surface == "ws":
        try:
            c = ws_try(gw, token)
        except HandshakeRejected as e:
            assert not ok, f"{case}: a valid token was refused: {e.status} {e.body!r}"
            _expect_401(e)
            return
        assert ok, f"{case}: the WebSocket upgrade succeeded with a bad token: {c.hello}"
        assert c.hello["anonymous"] is False
        st = subscribe(c, auth_run)
        assert st["seq"] >= 2
        c.close()
    elif surface == "sse":
        st = open_sse(gw, auth_run, "access_token=" + token)
        try:
            if ok:
                assert st.status == 200, f"{case}: {st.resp}"
                assert st.next_frame(5)["type"] == "state"
            else:
                _expect_401(st.resp)
        finally:
            st.close()
    else:
        for path in (f"/v1/runs/{auth_run}", f"/v1/runs/{auth_run}/events", "/v1/runs"):
            r = httpc.get(gw.url, path, headers=bearer(token))
            if ok:
                assert r.status == 200, f"{case} {path}: {r}"
            else:
                _expect_401(r)


@pytest.mark.parametrize("path", ["/v1/ws", "sse", "/v1/runs/{run}", "/v1/runs/{run}/events",
                                  "/v1/runs"])
def test_no_token_is_401_unauthorized(auth_dep, auth_run, path):
    gw = auth_dep.b
    if path == "/v1/ws":
        with pytest.raises(HandshakeRejected) as ei:
            WS.connect(gw.url)
        _expect_401(ei.value)
    elif path == "sse":
        st = open_sse(gw, auth_run)
        _expect_401(st.resp)
        st.close()
    else:
        _expect_401(httpc.get(gw.url, path.format(run=auth_run)))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_authorization_scheme_is_case_insensitive(auth_dep, auth_run, scheme):
    """RFC 7235 section 2.1: the auth-scheme is case-insensitive."""
    gw = auth_dep.b
    token = hs256()
    c = ws_try(gw, token, scheme=scheme)
    c.close()
    r = httpc.get(gw.url, f"/v1/runs/{auth_run}", headers=bearer(token, scheme))
    assert r.status == 200, (scheme, r)
    st = open_sse(gw, auth_run, headers=bearer(token, scheme))
    assert st.status == 200, (scheme, st.resp)
    st.close()


def test_token_in_subprotocol_selects_runcast_v1_and_is_not_echoed(auth_dep, auth_run):
    token = hs256()
    c = ws_try(auth_dep.b, token, via="subprotocol")
    proto = c.header("sec-websocket-protocol")
    assert proto == "runcast.v1", f"server must select runcast.v1, got {proto!r}"
    assert token not in repr(c.response_headers)
    assert c.hello["anonymous"] is False
    subscribe(c, auth_run)
    c.close()


def test_bad_token_in_subprotocol_is_401(auth_dep):
    with pytest.raises(HandshakeRejected) as ei:
        ws_try(auth_dep.b, hs256(exp=_now() - 3600), via="subprotocol")
    _expect_401(ei.value)


def test_token_in_access_token_query_on_websocket(auth_dep, auth_run):
    c = ws_try(auth_dep.b, hs256(), via="query")
    subscribe(c, auth_run)
    c.close()
    with pytest.raises(HandshakeRejected) as ei:
        ws_try(auth_dep.b, alg_none(), via="query")
    _expect_401(ei.value)


def test_header_token_is_used_first(auth_dep, auth_run):
    """Order: Authorization, then subprotocol, then access_token. A valid header with a junk query
    parameter works."""
    gw = auth_dep.b
    c = WS.connect(gw.url, path="/v1/ws?access_token=junk", headers=bearer(hs256()))
    assert c.recv_json(5)["type"] == "hello"
    c.close()


# ------------------------------------------------------------------------------ scope


@pytest.fixture(scope="module")
def scoped(auth_dep):
    exact = uid("ex")
    prefix = uid("team") + "-"
    covered = [exact, prefix + "1", prefix + "2"]
    uncovered = [exact + "x", uid("other"), prefix[:-1]]
    for r in covered + uncovered:
        publish_ok(auth_dep.a, r, [log(r)])
    token = hs256(runs=[exact], run_prefixes=[prefix])
    return {"exact": exact, "prefix": prefix, "covered": covered, "uncovered": uncovered,
            "token": token}


def test_scope_on_websocket_forbidden_frame_and_connection_stays(auth_dep, scoped):
    c = ws_try(auth_dep.b, scoped["token"])
    for r in scoped["covered"]:
        st = subscribe(c, r)
        assert st["seq"] >= 1
    for r in scoped["uncovered"]:
        c.send_json({"type": "subscribe", "run": r})
        f = expect_error_frame(c, "forbidden", run=r)
        schema.check_error_frame(f)
    seqs = publish_ok(auth_dep.a, scoped["exact"], log("still delivered"))
    assert [e["seq"] for e in collect_events(c, scoped["exact"], seqs[-1])] == seqs
    c.close()


def test_scope_on_sse_is_403_forbidden(auth_dep, scoped):
    for r in scoped["covered"]:
        st = open_sse(auth_dep.b, r, "access_token=" + scoped["token"])
        assert st.status == 200, (r, st.resp)
        st.close()
    for r in scoped["uncovered"]:
        st = open_sse(auth_dep.b, r, "access_token=" + scoped["token"])
        assert_error(st.resp, 403, "forbidden")
        st.close()


def test_scope_on_http_reads_is_403_forbidden(auth_dep, scoped):
    h = bearer(scoped["token"])
    for r in scoped["covered"]:
        assert httpc.get(auth_dep.b.url, f"/v1/runs/{r}", headers=h).status == 200
        assert httpc.get(auth_dep.b.url, f"/v1/runs/{r}/events", headers=h).status == 200
    for r in scoped["uncovered"]:
        assert_error(httpc.get(auth_dep.b.url, f"/v1/runs/{r}", headers=h), 403, "forbidden")
        assert_error(httpc.get(auth_dep.b.url, f"/v1/runs/{r}/events", headers=h), 403, "forbidden")


def test_run_list_is_filtered_by_scope(auth_dep, scoped):
    h = bearer(scoped["token"])

    def listed():
        r = httpc.get(auth_dep.b.url, "/v1/runs?limit=1000", headers=h)
        assert r.status == 200, r
        names = {s["run"] for s in r.json()["runs"]}
        return names if set(scoped["covered"]) <= names else None
    names = wait_until(listed, 10, what="covered runs listed")
    assert not (names & set(scoped["uncovered"])), f"list shows runs the token does not cover: {names & set(scoped['uncovered'])}"
    assert all(n == scoped["exact"] or n.startswith(scoped["prefix"]) for n in names), names


def test_token_without_runs_claims_covers_nothing(auth_dep, scoped):
    token = hs256(run_prefixes=DROP)
    c = ws_try(auth_dep.b, token)  # valid token: the upgrade succeeds
    c.send_json({"type": "subscribe", "run": scoped["exact"]})
    expect_error_frame(c, "forbidden", run=scoped["exact"])
    c.close()
    st = open_sse(auth_dep.b, scoped["exact"], "access_token=" + token)
    assert_error(st.resp, 403, "forbidden")
    st.close()
    r = httpc.get(auth_dep.b.url, "/v1/runs?limit=1000", headers=bearer(token))
    assert r.status == 200 and r.json()["runs"] == [], r


def test_empty_prefix_covers_every_run(auth_dep, scoped):
    token = hs256(run_prefixes=[""])
    c = ws_try(auth_dep.b, token)
    for r in scoped["covered"] + scoped["uncovered"]:
        subscribe(c, r)
    c.close()


# ------------------------------------------------------------------------------ anonymous + keys


def test_no_fallback_to_anonymous_for_a_bad_token(auth_anon_dep):
    gw = auth_anon_dep.a
    c = WS.connect(gw.url)
    hello = c.recv_json(5)
    assert hello["anonymous"] is True, hello
    c.close()
    for bad in (hs256(secret="another-secret-that-is-32-bytes-long!!", aud=DROP, iss=DROP),
                hs256(exp=_now() - 3600, aud=DROP, iss=DROP), "garbage"):
        with pytest.raises(HandshakeRejected) as ei:
            ws_try(gw, bad)
        _expect_401(ei.value)
        st = open_sse(gw, uid(), "access_token=" + bad)
        _expect_401(st.resp)
        st.close()
    c = ws_try(gw, hs256(aud=DROP, iss=DROP))
    assert c.hello["anonymous"] is False, c.hello
    c.close()


def test_rs256_and_es256_keys_by_kid(pem_dep, keys):
    gw = pem_dep.a
    for tok in (tokens.rs256(keys["rsa"], "rs1"), tokens.es256(keys["ec"], "es1")):
        c = ws_try(gw, tok)
        assert c.hello["anonymous"] is False
        subscribe(c, uid())
        c.close()


def test_asymmetric_forgeries_are_refused(pem_dep, keys):
    gw = pem_dep.a
    now = _now()
    forged = {
        "rs256 by another key": tokens.rs256(keys["other_rsa"], "rs1"),
        "hs256 signed with the RSA public key (algorithm confusion)":
            tokens.raw_token({"alg": "HS256", "typ": "JWT", "kid": "rs1"}, tokens.claims(),
                             keys["rs_pub_pem"]),
        "es256 token naming the rs256 key": tokens.es256(keys["ec"], "rs1"),
        "alg none naming rs1": tokens.raw_token({"alg": "none", "kid": "rs1"}, tokens.claims(), None),
        "unknown kid": tokens.rs256(keys["rsa"], "nope"),
        "expired rs256": tokens.rs256(keys["rsa"], "rs1", exp=now - 3600),
    }
    accepted = []
    for name, tok in forged.items():
        try:
            c = ws_try(gw, tok)
            accepted.append(name)
            c.close()
        except HandshakeRejected as e:
            _expect_401(e)
    assert not accepted, f"forged tokens accepted: {accepted}"


def test_jwks_keys(jwks_dep, keys):
    gw = jwks_dep.a
    for tok in (tokens.rs256(keys["rsa"], "jwks-rs"), tokens.es256(keys["ec"], "jwks-es")):
        c = ws_try(gw, tok)
        c.close()
    for tok in (tokens.rs256(keys["other_rsa"], "jwks-rs"), tokens.rs256(keys["rsa"], "unknown")):
        with pytest.raises(HandshakeRejected) as ei:
            ws_try(gw, tok)
        _expect_401(ei.value)


def test_hs256_kid(launcher):
    """--auth-hs256-kid: tokens naming that kid are checked with the secret, tokens without a kid
    too; a token naming another kid is refused."""
    from conftest import KINDS
    kind = KINDS[0]
    gw = launcher.gateway(kind, ["--auth-hs256-secret", SECRET, "--auth-hs256-kid", "app-2026"],
                          anonymous=False)
    try:
        for headers in ({"kid": "app-2026"}, None):
            c = ws_try(gw, hs256(headers=headers, aud=DROP, iss=DROP))
            c.close()
        with pytest.raises(HandshakeRejected) as ei:
            ws_try(gw, hs256(headers={"kid": "other"}, aud=DROP, iss=DROP))
        _expect_401(ei.value)
    finally:
        gw.stop()


def test_tokens_never_reach_metrics_or_logs(auth_dep, auth_run):
    """docs/security.md: tokens and keys never appear in logs or metrics; failures are counted by
    reason in runcast_auth_failures_total{reason}."""
    good = hs256(sub="secret-marker")
    bad = hs256(secret="another-secret-that-is-32-bytes-long!!")
    gw = auth_dep.b
    c = ws_try(gw, good)
    c.close()
    c = ws_try(gw, good, via="query")
    c.close()
    st = open_sse(gw, auth_run, "access_token=" + good)
    st.close()
    for tok in (bad, "junk-token-marker"):
        try:
            ws_try(gw, tok, via="query")
        except HandshakeRejected:
            pass
        httpc.get(gw.url, f"/v1/runs/{auth_run}", headers=bearer(tok))
    time.sleep(0.3)
    metrics = httpc.get(gw.url, "/metrics").text
    assert "runcast_auth_failures_total" in metrics
    logs = gw.proc.log_tail(10_000_000)
    for tok in (good, bad, "junk-token-marker"):
        sig = tok.rsplit(".", 1)[-1]
        assert sig not in metrics, "a token reached /metrics"
        assert sig not in logs, "a token reached the gateway's log"


def test_key_kid_defaults_to_its_file_name(launcher, keys):
    """security.md: "a key's kid defaults to its file name". Reading: the file name `rs1.pem`;
    the stem `rs1` is accepted as an alternative reading."""
    from conftest import KINDS
    gw = launcher.gateway(KINDS[0], ["--auth-key", keys["rs_pem"]], anonymous=False)
    try:
        worked = []
        for kid in ("rs1.pem", "rs1"):
            try:
                ws_try(gw, tokens.rs256(keys["rsa"], kid)).close()
                worked.append(kid)
            except HandshakeRejected:
                pass
        assert worked, "neither kid 'rs1.pem' nor 'rs1' selects the key loaded from rs1.pem"
        with pytest.raises(HandshakeRejected):
            ws_try(gw, tokens.rs256(keys["rsa"], "es1.pem"))
    finally:
        gw.stop()


def test_gateway_refuses_to_start_without_keys_or_allow_anonymous(launcher):
    from conftest import KINDS
    if "nats" not in KINDS:
        pytest.skip("runcast gateway needs NATS")
    gw = launcher.gateway("nats", anonymous=False, wait=False)
    try:
        gw.proc.p.wait(15)
    except Exception:  # noqa: BLE001
        pass
    alive = gw.proc.alive()
    text = gw.proc.log_tail()
    gw.stop()
    assert not alive, "runcast gateway started without token keys or --allow-anonymous"
    assert "--allow-anonymous" in text, text[-500:]

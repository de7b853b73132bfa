"""docs/protocol.md "Tokens expire, and so do the connections they opened": refresh, auth,
authenticated, unsubscribed for runs no longer covered, unauthorized for a bad fresh token, close
4003 at exp, and SSE streams ending at exp.

One scenario per deployment runs three clients side by side with 8-second tokens (so the refresh
comes 5 s before exp: a tenth of the lifetime is under the 5 s floor), and the tests check what
each observed.
"""

import json
import socket
import time

import pytest

from harness import log, open_sse, publish_ok, subscribe, uid
from tokens import bearer, hs256
from wsclient import WS, Timeout

LIFETIME = 8


@pytest.fixture(scope="module")
def scenario(auth_dep):
    gw = auth_dep.b
    ra, rb = uid("ra"), uid("rb")
    publish_ok(auth_dep.a, ra, log("a0"))
    publish_ok(auth_dep.a, rb, log("b0"))
    # Wait for the start of a second so the integer exp leaves a full LIFETIME.
    time.sleep(1 - (time.time() % 1) + 0.02)
    exp1 = int(time.time()) + LIFETIME
    t1 = hs256(runs=[ra, rb], run_prefixes=[], exp=exp1)
    obs = {"exp1": exp1, "ra": ra, "rb": rb, "A": [], "B": [], "C_end": None, "A_close": None,
           "B_close": None, "exp2": None}

    A = WS.connect(gw.url, headers=bearer(t1))
    assert A.recv_json(5)["type"] == "hello"
    subscribe(A, ra)
    subscribe(A, rb)
    A.send_json({"type": "auth", "token": "not-a-token"})
    B = WS.connect(gw.url, headers=bearer(hs256(runs=[ra], run_prefixes=[], exp=exp1)))
    assert B.recv_json(5)["type"] == "hello"
    subscribe(B, ra)
    C = open_sse(gw, ra, "access_token=" + hs256(runs=[ra], run_prefixes=[], exp=exp1))
    assert C.status == 200, C.resp
    C.next_event(5)

    published_after = None
    deadline = exp1 + 3.0
    while time.time() < deadline:
        for name, conn in (("A", A), ("B", B)):
            if obs[name + "_close"] is not None:
                continue
            try:
                m = conn.recv(0.05)
            except Timeout:
                continue
            now = time.time()
            if m.kind in ("close", "eof"):
                obs[name + "_close"] = (m.code, now)
                continue
            if m.kind != "text":
                continue
            f = json.loads(m.text)
            obs[name].append((now, f))
            if name == "A" and f["type"] == "refresh" and obs["exp2"] is None:
                exp2 = int(time.time()) + 120
                obs["exp2"] = exp2
                A.send_json({"type": "auth", "token": hs256(runs=[ra], run_prefixes=[], exp=exp2)})
        if obs["C_end"] is None:
            try:
                item = C.next_item(0.05)
                if item is None:
                    obs["C_end"] = time.time()
            except TimeoutError:
                pass
            except (OSError, socket.error):
                obs["C_end"] = time.time()
        if published_after is None and time.time() > exp1 + 1.5:
            published_after = publish_ok(auth_dep.a, ra, log("after exp1"))
            obs["published_after"] = published_after
    for conn in (A, B):
        conn.abort()
    C.close()
    return obs


def frames(obs, who, type_):
    return [(t, f) for t, f in obs[who] if f["type"] == type_]


def test_invalid_fresh_token_gets_unauthorized_error_frame(scenario):
    errs = frames(scenario, "A", "error")
    assert errs, f"no error frame for a bad auth token; A saw {[f for _, f in scenario['A']]}"
    assert errs[0][1]["code"] == "unauthorized", errs[0][1]


def test_refresh_is_sent_before_exp(scenario):
    exp1 = scenario["exp1"]
    for who in ("A", "B"):
        r = frames(scenario, who, "refresh")
        assert r, f"{who} got no refresh frame; saw {[f for _, f in scenario[who]]}"
        t, f = r[0]
        assert f["expires"] == exp1, f"refresh.expires should be the token's exp {exp1}: {f}"
        # a tenth of the remaining lifetime, clamped to 5..60 s: here 5 s before exp
        assert exp1 - 5 - 1.5 <= t <= exp1 - 5 + 1.5, f"{who}: refresh at exp{t - exp1:+.2f}s"


def test_auth_is_answered_with_authenticated(scenario):
    a = frames(scenario, "A", "authenticated")
    assert a, f"no authenticated frame; A saw {[f for _, f in scenario['A']]}"
    assert a[0][1]["expires"] == scenario["exp2"], a[0][1]


def test_runs_the_new_token_does_not_cover_are_unsubscribed(scenario):
    u = frames(scenario, "A", "unsubscribed")
    assert [f["run"] for _, f in u] == [scenario["rb"]], [f for _, f in scenario["A"]]


def test_refreshed_connection_outlives_the_old_token(scenario):
    assert scenario["A_close"] is None, f"A was closed: {scenario['A_close']} (exp1={scenario['exp1']})"
    evs = [f for _, f in frames(scenario, "A", "event") if f["run"] == scenario["ra"]]
    assert [e["seq"] for e in evs] == scenario.get("published_after"), evs


def test_connection_without_fresh_token_closes_4003_at_exp(scenario):
    cl = scenario["B_close"]
    assert cl is not None, "B was not closed at exp"
    code, t = cl
    assert code == 4003, f"expected close 4003, got {code}"
    assert scenario["exp1"] - 1 <= t <= scenario["exp1"] + 2.5, f"closed at exp{t - scenario['exp1']:+.2f}s"


def test_sse_stream_ends_at_exp(scenario):
    t = scenario["C_end"]
    assert t is not None, "the SSE stream did not end at exp"
    assert scenario["exp1"] - 1 <= t <= scenario["exp1"] + 2.5, f"ended at exp{t - scenario['exp1']:+.2f}s"

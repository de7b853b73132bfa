"""Deeply nested data (docs/protocol.md "Event data"): at most 64 levels of nested arrays and
objects, deeper is refused at publish with 400 `data_too_deep` (and stores nothing); events
published straight to NATS skip that check and then reach clients as a JSON string holding the
payload's text. In every case nothing may stop the run, any other run, or the run list from being
served (state, history, WebSocket, SSE).

Each case runs on a fresh deployment (with its own nats-server on NATS), so that one poisoned
or crashed deployment cannot fail the other cases or other test files.
"""

import json
import sys

import pytest

import httpc
from conftest import KINDS
from harness import log, open_sse, publish, publish_ok, uid, wait_until, ws



@pytest.fixture(params=KINDS)
def deep_dep(request, launcher):
    d = launcher.deploy(request.param, n=2, own_nats=True)
    yield d
    d.stop()


def nested_array(depth):
    return "[" * depth + "]" * depth


def nested_object(depth):
    return '{"a":' * depth + "1" + "}" * depth


def nested_mixed(depth):
    out, close = "", ""
    for i in range(depth):
        if i % 2:
            out += '{"k":'
            close = "}" + close
        else:
            out += "["
            close = "]" + close
    return out + "null" + close


CASES = [("array", nested_array), ("object", nested_object), ("mixed", nested_mixed)]


def _get(gw, path, problems):
    try:
        return httpc.get(gw.url, path, timeout=5)
    except Exception as e:  # noqa: BLE001
        alive = gw.proc.alive()
        problems.append(f"GET {path} on {gw.name}: {e!r}"
                        + ("" if alive else f"; the process DIED: {gw.proc.log_tail(300)!r}"))
        return None


def _healthy(dep, run, control, accepted, data_text, kind):
    """Everything that must keep working; returns a list of problems."""
    problems = []
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for gw in dep.gateways:
            if not gw.proc.alive():
                problems.append(f"{gw.name} died: {gw.proc.log_tail(600)}")
                return problems
            r = _get(gw, "/v1/runs?limit=1000", problems)
            if r is not None and r.status != 200:
                problems.append(f"GET /v1/runs on {gw.name}: {r.status} {r.body[:200]!r}")
            r = _get(gw, "/v1/runs?status=running&limit=1000", problems)
            if r is not None and r.status != 200:
                problems.append(f"GET /v1/runs?status=running on {gw.name}: {r.status} {r.body[:200]!r}")
            for rr in ([run] if accepted else []) + [control]:
                r = _get(gw, f"/v1/runs/{rr}", problems)
                if r is not None and r.status != 200:
                    problems.append(f"GET state {rr} on {gw.name}: {r.status} {r.body[:200]!r}")
                r = _get(gw, f"/v1/runs/{rr}/events", problems)
                if r is not None and r.status != 200:
                    problems.append(f"GET history {rr} on {gw.name}: {r.status} {r.body[:200]!r}")
                elif r is not None and rr == run:
                    evs = json.loads(r.body)["events"]
                    if not evs or evs[-1]["data"] != json.loads(data_text):
                        problems.append(f"history data of {rr} changed")
                # WebSocket
                try:
                    c = ws(gw)
                    c.send_json({"type": "subscribe", "run": rr, "since": 0})
                    st = c.recv_json(5)
                    if st.get("type") != "state":
                        problems.append(f"WS subscribe {rr} on {gw.name}: {str(st)[:200]}")
                    else:
                        ev = c.recv_json(5)
                        if ev.get("type") != "event":
                            problems.append(f"WS replay {rr} on {gw.name}: {str(ev)[:200]}")
                    c.close()
                except Exception as e:  # noqa: BLE001
                    problems.append(f"WS {rr} on {gw.name}: {e!r}")
                # SSE
                try:
                    s = open_sse(gw, rr, "since=0", timeout=5)
                    if s.status != 200:
                        problems.append(f"SSE {rr} on {gw.name}: {s.status} {s.resp.body[:200]!r}")
                    else:
                        e1 = s.next_event(5)
                        e2 = s.next_event(5)
                        if e1 is None or e2 is None:
                            problems.append(f"SSE {rr} on {gw.name}: stream ended early")
                        else:
                            json.loads(e1.data)
                            json.loads(e2.data)
                    s.close()
                except Exception as e:  # noqa: BLE001
                    problems.append(f"SSE {rr} on {gw.name}: {e!r}")
    finally:
        sys.setrecursionlimit(old)
    return problems


KINDS_OF_EVENT = ["log", "progress", "status", "complete"]


@pytest.mark.parametrize("kind", KINDS_OF_EVENT)
@pytest.mark.parametrize("shape,make", CASES, ids=[c[0] for c in CASES])
def test_data_deeper_than_64_levels_is_refused_and_harmless(deep_dep, kind, shape, make):
    dep = deep_dep
    control = uid("ctl")
    publish_ok(dep.a, control, [log("before"), {"kind": "progress", "data": {"done": 1, "total": 2}}])
    problems = []
    for depth in (65, 200):
        run = uid("deep")
        r = publish(dep.a, run, None, raw=('{"kind":"%s","data":%s}' % (kind, make(depth))).encode())
        if r.status == 200:
            problems.append(f"depth {depth}: accepted (docs: 400 data_too_deep)")
            problems += _healthy(dep, run, control, True, make(depth), kind)
            continue
        if r.status != 400 or r.error()["code"] != "data_too_deep":
            problems.append(f"depth {depth}: {r.status} {r.body[:200]!r} (docs: 400 data_too_deep)")
        if httpc.get(dep.b.url, f"/v1/runs/{run}").status != 404:
            problems.append(f"depth {depth}: a refused publish stored something")
        # in a batch: all or nothing
        r = publish(dep.a, run, None, raw=('[{"kind":"log","data":1},{"kind":"%s","data":%s}]'
                                           % (kind, make(depth))).encode())
        if r.status != 400:
            problems.append(f"depth {depth} in a batch: {r.status}")
        if httpc.get(dep.b.url, f"/v1/runs/{run}").status != 404:
            problems.append(f"depth {depth} in a batch: the batch was partly stored")
    publish_ok(dep.a, control, log("after"))
    problems += _healthy(dep, uid("none"), control, False, None, kind)
    assert not problems, problems


@pytest.mark.parametrize("kind", KINDS_OF_EVENT)
@pytest.mark.parametrize("shape,make", CASES, ids=[c[0] for c in CASES])
def test_data_of_64_levels_is_accepted_and_served_everywhere(deep_dep, kind, shape, make):
    dep = deep_dep
    control = uid("ctl")
    publish_ok(dep.a, control, [log("before")])
    run = uid("deep64")
    data_text = make(64)
    r = publish(dep.a, run, None, raw=('{"kind":"%s","data":%s}' % (kind, data_text)).encode())
    assert r.status == 200, f"64 levels is within the limit: {r.status} {r.body[:200]!r}"
    if dep.kind == "nats":
        try:
            wait_until(lambda: any(s["run"] == run for s in
                                   httpc.get(dep.b.url, "/v1/runs?limit=1000").json()["runs"]), 5)
        except AssertionError:
            pass
    problems = _healthy(dep, run, control, True, data_text, kind)
    assert not problems, problems


@pytest.mark.parametrize("payload,expect", [
    ("deep", "string"), ("deep64", "json"), ("not json {", "string"), (b"bad utf8 \xff\xfe", "string_fffd"),
], ids=["deep200", "deep64", "not-json", "invalid-utf8"])
def test_data_published_straight_to_nats_never_breaks_a_run(deep_dep, payload, expect):
    """Docs: "a payload that is not JSON, or JSON nested deeper than 64 levels, reaches clients as a JSON
    string holding the payload's text (invalid UTF-8 replaced by U+FFFD). Nothing a publisher
    stores can stop a run, or the run list, from being served"."""
    dep = deep_dep
    if dep.kind != "nats":
        pytest.skip("NATS only")
    if payload == "deep":
        raw = nested_object(200).encode()
    elif payload == "deep64":
        raw = nested_object(64).encode()
    elif isinstance(payload, bytes):
        raw = payload
    else:
        raw = payload.encode()
    control = uid("ctl")
    publish_ok(dep.a, control, [log("before")])
    problems = []
    for kind in KINDS_OF_EVENT:
        run = uid("nd")
        nc = dep.nats.client()
        try:
            ack = nc.js_publish(f"runcast.runs.{run}.{kind}", raw)
        finally:
            nc.close()
        r = httpc.get(dep.b.url, f"/v1/runs/{run}/events", timeout=5)
        if r.status != 200:
            problems.append(f"{kind}: history {r.status} {r.body[:200]!r}")
        else:
            old = sys.getrecursionlimit()
            sys.setrecursionlimit(10000)
            try:
                evs = json.loads(r.body)["events"]
            finally:
                sys.setrecursionlimit(old)
            if [e["seq"] for e in evs] != [ack["seq"]]:
                problems.append(f"{kind}: history seqs {[e['seq'] for e in evs]} != {[ack['seq']]}")
            else:
                d = evs[0]["data"]
                if expect == "string" and d != raw.decode():
                    problems.append(f"{kind}: expected the payload text as a JSON string, got {str(d)[:80]!r}")
                if expect == "string_fffd" and d != raw.decode("utf-8", "replace"):
                    problems.append(f"{kind}: expected a string with U+FFFD, got {d!r}")
                if expect == "json" and d != json.loads(raw):
                    problems.append(f"{kind}: 64-level JSON should stay JSON, got {str(d)[:80]!r}")
        text = raw.decode("utf-8", "replace")
        problems += [f"{kind}: {p}" for p in _healthy(dep, run, control, True,
                                                         json.dumps(text) if expect != "json" else text,
                                                         kind)]
    assert not problems, problems

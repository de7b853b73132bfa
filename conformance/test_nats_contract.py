"""docs/publishing.md "The NATS contract", acted out by a worker speaking the NATS protocol
directly (a minimal client in natsc.py), against the NATS-backed gateways."""

import json
import uuid

import pytest

import httpc
from harness import (collect_events, get_json, log, progress, publish_ok, subscribe, uid,
                     wait_until, ws)


@pytest.fixture
def nats_dep(dep):
    if dep.kind != "nats":
        pytest.skip("NATS deployment only")
    return dep


@pytest.fixture
def nc(nats_dep):
    c = nats_dep.nats.client()
    yield c
    c.close()


def test_jetstream_publish_ack_seq_is_the_event_seq(nats_dep, nc):
    run = uid("nw")
    c = ws(nats_dep.b)
    subscribe(c, run)
    acks = [nc.js_publish(f"runcast.runs.{run}.progress", json.dumps({"done": i, "total": 3}).encode(),
                          headers={"Nats-Msg-Id": str(uuid.uuid4())}) for i in (1, 2, 3)]
    assert all(a.get("stream") == "RUNCAST_EVENTS" for a in acks), acks
    seqs = [a["seq"] for a in acks]
    evs = collect_events(c, run, seqs[-1])
    assert [e["seq"] for e in evs] == seqs
    assert [e["data"] for e in evs] == [{"done": i, "total": 3} for i in (1, 2, 3)]
    assert all(e["kind"] == "progress" for e in evs)
    c.close()
    # Workers never write state; the gateways fold it.
    s = wait_until(lambda: (x := get_json(nats_dep.a, f"/v1/runs/{run}")) and x["seq"] == seqs[-1] and x, 5)
    assert s["percent"] == pytest.approx(100.0) and s["events"] == 3, s


def test_nats_msg_id_deduplicates(nats_dep, nc):
    run = uid("nd")
    mid = "dup-" + uuid.uuid4().hex
    a1 = nc.js_publish(f"runcast.runs.{run}.log", b'{"line":"once"}', headers={"Nats-Msg-Id": mid})
    a2 = nc.js_publish(f"runcast.runs.{run}.log", b'{"line":"once"}', headers={"Nats-Msg-Id": mid})
    assert a2.get("duplicate") is True and a2["seq"] == a1["seq"], (a1, a2)
    h = get_json(nats_dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == [a1["seq"]]


def test_core_publish_without_ack_is_stored_too(nats_dep, nc):
    """`nats pub runcast.runs.r1.progress '{"done":3,"total":10}'` is also stored."""
    run = uid("np")
    nc.publish(f"runcast.runs.{run}.progress", b'{"done":3,"total":10}')
    nc.flush()

    def stored():
        r = httpc.get(nats_dep.b.url, f"/v1/runs/{run}/events")
        return r.status == 200 and r.json()["events"]
    evs = wait_until(stored, 5, what="core-published event stored")
    assert evs[0]["data"] == {"done": 3, "total": 10}


def test_non_json_payload_is_delivered_as_a_json_string(nats_dep, nc):
    run = uid("nj")
    ack = nc.js_publish(f"runcast.runs.{run}.log", b"plain text, not json")
    h = get_json(nats_dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == [ack["seq"]]
    assert h["events"][0]["data"] == "plain text, not json", h["events"][0]


def test_payload_is_delivered_verbatim(nats_dep, nc):
    run = uid("nv")
    payload = b'{"z": 1,\n  "a": [1.0, 12345678901234567890123],  "u": "\\u00e9"}'
    ack = nc.js_publish(f"runcast.runs.{run}.custom-kind", payload)
    c = ws(nats_dep.b)
    subscribe(c, run, since=0)
    t = c.recv_text(5)
    c.close()
    assert payload.decode() in t, f"payload not verbatim in the frame: {t}"
    assert json.loads(t)["seq"] == ack["seq"] and json.loads(t)["kind"] == "custom-kind"


def test_subjects_breaking_the_rules_are_skipped(nats_dep, nc):
    run = uid("ns")
    a1 = nc.js_publish(f"runcast.runs.{run}.log", b'{"line":"ok 1"}')
    for subj in (f"runcast.runs.{run}.Bad_Kind", f"runcast.runs.{run}", f"runcast.runs.{run}.log.extra",
                 f"runcast.runs.{run}." + "k" * 65):
        nc.js_publish(subj, b'{"line":"skip me"}')
    a2 = nc.js_publish(f"runcast.runs.{run}.log", b'{"line":"ok 2"}')
    h = get_json(nats_dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == [a1["seq"], a2["seq"]], h["events"]
    c = ws(nats_dep.b)
    subscribe(c, run, since=0)
    evs = collect_events(c, run, a2["seq"])
    c.close()
    assert [e["seq"] for e in evs] == [a1["seq"], a2["seq"]]
    for gw in nats_dep.gateways:
        assert httpc.get(gw.url, "/readyz").status == 200


def test_traceparent_header_reaches_event_frames(nats_dep, nc):
    run = uid("nt")
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ack = nc.js_publish(f"runcast.runs.{run}.log", b'{"line":"traced"}', headers={"traceparent": tp})
    h = get_json(nats_dep.b, f"/v1/runs/{run}/events")
    assert h["events"][0]["seq"] == ack["seq"]
    assert h["events"][0].get("traceparent") == tp, h["events"][0]


def test_state_is_in_the_kv_bucket(nats_dep, nc):
    """`nats kv get RUNCAST_RUNS <run>` shows the state (read here through the JetStream API)."""
    run = uid("nk")
    seqs = publish_ok(nats_dep.a, run, [progress(2, 4), {"kind": "status", "data": {"state": "x"}}])

    def kv():
        v = nc.kv_get("RUNCAST_RUNS", run)
        return v and json.loads(v)
    v = wait_until(lambda: (x := kv()) and x.get("seq") == seqs[-1] and x, 10, what="state in KV")
    assert v["run"] == run and v["events"] == 2 and v["status"] == "running", v


def test_http_published_events_are_on_the_stream_subject(nats_dep, nc):
    """The HTTP publish API publishes to runcast.runs.<run>.<kind> like any worker."""
    run = uid("nh")
    seqs = publish_ok(nats_dep.a, run, log("via http"))
    _, data = nc.request("$JS.API.STREAM.MSG.GET.RUNCAST_EVENTS",
                         json.dumps({"seq": seqs[0]}).encode())
    msg = json.loads(data)["message"]
    assert msg["subject"] == f"runcast.runs.{run}.log", msg


def test_publishing_py_snippet_with_nats_py(nats_dep):
    """docs/publishing.md Python snippet (optional: needs nats-py, not a suite requirement)."""
    nats = pytest.importorskip("nats")
    import asyncio

    run = uid("nightly-scan")

    async def main():
        nc = await nats.connect(nats_dep.nats.url)
        js = nc.jetstream()
        ack = await js.publish(f"runcast.runs.{run}.progress",
                               json.dumps({"done": 3, "total": 10}).encode(),
                               headers={"Nats-Msg-Id": str(uuid.uuid4())})
        await nc.close()
        return ack.seq

    seq = asyncio.run(main())
    h = get_json(nats_dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == [seq]
    del nats


def test_event_over_the_bus_event_limit_is_413_too_large(nats_dep, launcher):
    """docs: too_large (413) for "an event over the bus's event limit": with --max-publish 4MiB,
    a 1.5 MiB event passes the body limit but not NATS's default 1 MiB message limit."""
    from harness import assert_error, publish
    gw = launcher.gateway("nats", ["--max-publish", "4MiB"], nats=nats_dep.nats)
    try:
        run = uid("big")
        r = publish(gw, run, {"kind": "log", "data": {"pad": "b" * (1536 * 1024)}}, timeout=30)
        assert_error(r, 413, "too_large")
        assert httpc.get(gw.url, f"/v1/runs/{run}").status == 404, "a rejected publish stores nothing"
        assert httpc.get(gw.url, "/readyz").status == 200
    finally:
        gw.stop()

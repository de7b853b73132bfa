"""Retention and `gap` (docs/protocol.md "gap", history `gap`, SSE gap id, client rule 4).

gap_dep keeps 5 events per run (embedded) / per run and kind (NATS: messages per subject).
"""

import json

import pytest

import httpc
import schema
from harness import (collect_events, get_json, open_sse, progress, publish_ok, subscribe, uid,
                     ws)


def _check_gap_covers(gap, dropped, retained, since):
    """The gap must cover exactly the dropped events after `since`, and end before the first
    retained one. On the embedded bus seqs are consecutive, so the range is exact."""
    assert gap["from"] >= since + 1, f"gap starts at or before the cursor {since}: {gap}"
    lost = [s for s in dropped if s > since]
    assert gap["from"] <= lost[0] and gap["to"] >= lost[-1], f"gap {gap} must cover {lost}"
    assert gap["to"] < retained[0], f"gap {gap} covers the retained event {retained[0]}"


@pytest.fixture(scope="module")
def trimmed(gap_dep):
    run = uid("gap")
    seqs = publish_ok(gap_dep.a, run, [progress(i, 8) for i in range(1, 9)])
    return run, seqs[:3], seqs[3:]


def test_ws_since_0_gets_gap_then_retained_events(gap_dep, trimmed):
    run, dropped, retained = trimmed
    c = ws(gap_dep.b)
    subscribe(c, run, since=0)
    f = c.recv_json(5)
    schema.check_gap(f, run)
    _check_gap_covers(f, dropped, retained, 0)
    if gap_dep.kind == "embedded":
        assert (f["from"], f["to"]) == (1, 3), f
    evs = collect_events(c, run, retained[-1])
    assert [e["seq"] for e in evs] == retained
    c.close()


def test_ws_cursor_inside_the_dropped_range(gap_dep, trimmed):
    run, dropped, retained = trimmed
    c = ws(gap_dep.b)
    subscribe(c, run, since=dropped[1])
    f = c.recv_json(5)
    schema.check_gap(f, run)
    _check_gap_covers(f, dropped, retained, dropped[1])
    assert [e["seq"] for e in collect_events(c, run, retained[-1])] == retained
    c.close()


def test_ws_cursor_at_last_dropped_event_has_no_gap(gap_dep, trimmed):
    run, dropped, retained = trimmed
    c = ws(gap_dep.b)
    subscribe(c, run, since=dropped[-1])
    gaps = []
    evs = collect_events(c, run, retained[-1], gaps=gaps)
    assert [e["seq"] for e in evs] == retained
    # On NATS the range between the last dropped and first retained seq holds no event of this
    # run; the docs allow a gap there only "when a cursor is older than the oldest message".
    if gap_dep.kind == "embedded":
        assert gaps == [], gaps
    c.close()


def test_resume_from_gap_to_loses_nothing_more(gap_dep, trimmed):
    """Rule 1: the cursor becomes the gap's `to`; resuming from it gets the retained events."""
    run, dropped, retained = trimmed
    c = ws(gap_dep.b)
    subscribe(c, run, since=0)
    gap = c.recv_json(5)
    assert gap["type"] == "gap", gap
    c.abort()
    c2 = ws(gap_dep.a)
    subscribe(c2, run, since=gap["to"])
    assert [e["seq"] for e in collect_events(c2, run, retained[-1])] == retained
    c2.close()


def test_sse_gap_carries_id_to(gap_dep, trimmed):
    run, dropped, retained = trimmed
    st = open_sse(gap_dep.b, run, "since=0")
    try:
        st.next_event(5)  # state
        ev = st.next_event(5)
        f = json.loads(ev.data)
        schema.check_gap(f, run)
        assert ev.last_event_id == str(f["to"]), f"gap id should be its `to`: {ev.last_event_id} {f}"
        seqs = []
        while len(seqs) < len(retained):
            seqs.append(json.loads(st.next_event(5).data)["seq"])
        assert seqs == retained
    finally:
        st.close()


def test_history_page_reports_the_gap(gap_dep, trimmed):
    run, dropped, retained = trimmed
    h = get_json(gap_dep.b, f"/v1/runs/{run}/events?since=0")
    schema.check_history(h, run)
    assert h["gap"] is not None, h
    _check_gap_covers(h["gap"], dropped, retained, 0)
    assert [e["seq"] for e in h["events"]] == retained
    assert h["first"] == retained[0], h
    assert h["head"] == retained[-1], h


def test_state_outlives_dropped_events(gap_dep, trimmed):
    """"it keeps counting ... after retention drops its first events"."""
    run, dropped, retained = trimmed
    s = get_json(gap_dep.b, f"/v1/runs/{run}")
    if gap_dep.kind == "nats":
        # docs (protocol.md, README): on NATS, events retention drops before they are folded (one
        # burst larger than the per-run limit, as here) are not counted; the retained ones are.
        assert len(retained) <= s["events"] <= 8, s
    else:
        assert s["events"] == 8, s
    assert s["seq"] == retained[-1], s


def test_state_outlives_dropped_events_when_published_one_by_one(gap_dep):
    """Same, with each event folded before the next is published."""
    import time
    run = uid("gapp")
    seqs, first_ts = [], None
    for i in range(1, 9):
        seqs += publish_ok(gap_dep.a, run, [progress(i, 8)])
        if gap_dep.kind == "nats":
            time.sleep(0.25)  # give the fold consumer time to fold it before the next publish
        if i == 1:
            first_ts = get_json(gap_dep.a, f"/v1/runs/{run}/events")["events"][0]["ts"]
    s = get_json(gap_dep.b, f"/v1/runs/{run}")
    assert s["events"] == 8, s
    assert s["started_ts"] == first_ts, (s, first_ts)
    h = get_json(gap_dep.b, f"/v1/runs/{run}/events")
    assert [e["seq"] for e in h["events"]] == seqs[3:]


# ------------------------------------------------------------------------------ age and TTLs

from conftest import KINDS  # noqa: E402


@pytest.fixture(scope="module", params=KINDS)
def age_dep(request, launcher):
    d = launcher.deploy(request.param, ["--history-age", "2s", "--finished-ttl", "1s"], n=1,
                        own_nats=True)
    yield d
    d.stop()


def test_events_older_than_history_age_become_a_gap(age_dep):
    import time
    run = uid("age")
    old = publish_ok(age_dep.a, run, [progress(1, 4), progress(2, 4)])
    time.sleep(2.2)
    # The docs give no time for the trimming itself; wait (bounded) until history drops them.
    deadline = time.monotonic() + 12
    while True:
        h = get_json(age_dep.a, f"/v1/runs/{run}/events")
        if not any(e["seq"] in old for e in h["events"]):
            break
        assert time.monotonic() < deadline, "events older than --history-age 2s kept for 14 s"
        time.sleep(0.25)
    problems = []
    # Phase 1: every event of the run has expired. A reader from 0 must be told, not left in
    # silence -- unless the run itself is forgotten (its state also expires --history-age after
    # its last event, and then the run looks like one with no events at all).
    forgotten = httpc.get(age_dep.a.url, f"/v1/runs/{run}").status == 404
    if h["gap"] is None and not forgotten:
        problems.append(f"history since=0 after expiry: no gap, events={h['events']}, first={h['first']}")
    c = ws(age_dep.a)
    subscribe(c, run, since=0)
    try:
        f = c.recv_json(1.5)
    except Exception as e:  # noqa: BLE001
        f = repr(e)
    if not (isinstance(f, dict) and f.get("type") == "gap") and not forgotten:
        problems.append(f"WS since=0 after expiry: expected a gap frame, got {f}")
    c.close()
    # Phase 2: a new event arrives; since=0 gets the gap, then the new event.
    new = publish_ok(age_dep.a, run, [progress(3, 4)])
    c = ws(age_dep.a)
    subscribe(c, run, since=0)
    f = c.recv_json(5)
    if f["type"] != "gap":
        problems.append(f"WS since=0 after a new event: expected a gap frame first, got {f}")
    else:
        _check_gap_covers(f, old, new, 0)
        got = [e["seq"] for e in collect_events(c, run, new[-1])]
        if got != new:
            problems.append(f"after the gap: {got} != {new}")
    c.close()
    assert not problems, problems


def test_finished_run_is_forgotten_after_finished_ttl(age_dep):
    """Embedded bus only (docs: --finished-ttl applies only to the embedded bus)."""
    import time
    if age_dep.kind != "embedded":
        pytest.skip("--finished-ttl applies only to the embedded bus")
    run = uid("ttl")
    publish_ok(age_dep.a, run, [progress(1, 1), {"kind": "complete", "data": {}}])
    assert httpc.get(age_dep.a.url, f"/v1/runs/{run}").status == 200
    deadline = time.monotonic() + 6
    while httpc.get(age_dep.a.url, f"/v1/runs/{run}").status == 200:
        assert time.monotonic() < deadline, "finished run still there 6 s after --finished-ttl 1s"
        time.sleep(0.2)
    r = httpc.get(age_dep.a.url, f"/v1/runs/{run}")
    assert r.status == 404 and r.error()["code"] == "run_not_found", r
    assert run not in {s["run"] for s in get_json(age_dep.a, "/v1/runs?limit=1000")["runs"]}


def test_mixed_kinds_lose_nothing_in_silence(gap_dep):
    """docs: losses are announced by `gap` frames. With a chatty kind and a sparse one (on NATS the
    limit counts per run and kind), every published event is either delivered or inside a gap."""
    run = uid("mixed")
    seqs = publish_ok(gap_dep.a, run, [progress(1, 2)])
    seqs += publish_ok(gap_dep.a, run, [{"kind": "log", "data": {"line": i}} for i in range(7)])
    seqs += publish_ok(gap_dep.a, run, [progress(2, 2)])
    c = ws(gap_dep.b)
    subscribe(c, run, since=0)
    gaps = []
    evs = collect_events(c, run, seqs[-1], gaps=gaps)
    c.close()
    delivered = [e["seq"] for e in evs]
    assert delivered == sorted(delivered) and len(set(delivered)) == len(delivered), delivered
    silent = [s for s in seqs
              if s not in delivered and not any(g["from"] <= s <= g["to"] for g in gaps)]
    assert not silent, f"lost without a gap: {silent} (delivered {delivered}, gaps {gaps})"
    assert delivered[-1] == seqs[-1]

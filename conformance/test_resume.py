"""Resume at every cut point (docs/protocol.md "Writing a client that loses nothing", SSE resume).

For each k, a client reads the first k frames of a subscription on gateway A, the connection is
cut (no close handshake), more events are published while it is away, and the client resumes on
gateway B (the other NATS-backed gateway; the same process on the embedded bus) with the cursor the
docs say to keep. Every event must arrive exactly once, in order, with its data.
"""

import json
import time

import pytest

import sse
from harness import (collect_events, open_sse, progress, publish_ok, sse_collect, subscribe, uid,
                     ws)

PRE, LIVE, LATER = 3, 3, 2


def _events(prefix, n, start):
    return [{"kind": "progress", "data": {"done": start + i, "total": 100, "tag": prefix}}
            for i in range(n)]


def _ws_scenario(dep, mode, k):
    run = uid("rs")
    pre = publish_ok(dep.a, run, _events("pre", PRE, 1))
    c = ws(dep.a)
    st = subscribe(c, run, since=0 if mode == "since0" else None)
    # Rule 1: after a fresh subscribe, cursor = state.seq; with since: the since we asked for.
    cursor = 0 if mode == "since0" else st["seq"]
    got = []
    live = publish_ok(dep.a, run, _events("live", LIVE, 1 + PRE))
    expected_first = (pre if mode == "since0" else []) + live
    for _ in range(k - 1):
        f = c.recv_json(5)
        assert f["type"] == "event", f
        assert f["seq"] > cursor, f"event at or below the cursor within one connection: {f}"
        got.append(f)
        cursor = f["seq"]
    c.abort()
    later = publish_ok(dep.a, run, _events("later", LATER, 1 + PRE + LIVE))
    c2 = ws(dep.b)
    subscribe(c2, run, since=cursor)
    rest = collect_events(c2, run, later[-1])
    c2.close()
    seqs = [e["seq"] for e in got + rest]
    expected = expected_first + later
    return seqs, expected, [e["data"]["done"] for e in got + rest]


@pytest.mark.parametrize("mode", ["since0", "fresh"])
def test_ws_resume_at_every_cut_point(dep, mode):
    total = 1 + (PRE if mode == "since0" else 0) + LIVE
    bad = []
    for k in range(1, total + 1):
        seqs, expected, dones = _ws_scenario(dep, mode, k)
        if seqs != expected:
            bad.append((k, seqs, expected))
        first_done = 1 if mode == "since0" else PRE + 1
        if dones != list(range(first_done, PRE + LIVE + LATER + 1)) and seqs == expected:
            bad.append((k, "data", dones))
    assert not bad, f"cuts that lost/duplicated/reordered events (k, got, expected): {bad}"


def _sse_open(gw, run, mode, last_id, how):
    """how: 'lei' = Last-Event-ID on the plain URL; 'since' = ?since=<last id>;
    'eventsource' = the same URL as the first connection plus Last-Event-ID (what a browser does)."""
    first_query = "since=0" if mode == "since0" else ""
    if last_id is None:
        return open_sse(gw, run, first_query)
    if how == "lei":
        return open_sse(gw, run, "", headers={"Last-Event-ID": last_id})
    if how == "since":
        return open_sse(gw, run, f"since={last_id}")
    return open_sse(gw, run, first_query, headers={"Last-Event-ID": last_id})


def _sse_scenario(dep, mode, k, how):
    run = uid("rs")
    pre = publish_ok(dep.a, run, _events("pre", PRE, 1))
    st = _sse_open(dep.a, run, mode, None, how)
    assert st.status == 200, st.resp
    ev = st.next_event(5)
    f = json.loads(ev.data)
    assert f["type"] == "state", f
    live = publish_ok(dep.a, run, _events("live", LIVE, 1 + PRE))
    got = []
    for _ in range(k - 1):
        ev = st.next_event(5)
        f = json.loads(ev.data)
        assert f["type"] == "event", f
        got.append(f)
    last_id = st.last_event_id
    st.close()
    later = publish_ok(dep.a, run, _events("later", LATER, 1 + PRE + LIVE))
    st2 = _sse_open(dep.b, run, mode, last_id, how)
    try:
        assert st2.status == 200, (st2.resp, last_id)
        f = json.loads(st2.next_event(5).data)
        assert f["type"] == "state", f
        rest = sse_collect(st2, run, later[-1])
    finally:
        st2.close()
    expected = (pre if mode == "since0" else []) + live + later
    return [e["seq"] for e in got + rest], expected


@pytest.mark.parametrize("how", ["lei", "since", "eventsource"])
@pytest.mark.parametrize("mode", ["since0", "fresh"])
def test_sse_resume_at_every_cut_point(dep, mode, how):
    total = 1 + (PRE if mode == "since0" else 0) + LIVE
    bad = []
    for k in range(1, total + 1):
        seqs, expected = _sse_scenario(dep, mode, k, how)
        if seqs != expected:
            bad.append((k, seqs, expected))
    assert not bad, f"cuts that lost/duplicated/reordered events (k, got, expected): {bad}"


@pytest.mark.parametrize("mode", ["live", "replay"])
def test_sse_resume_at_every_byte(dep, mode):
    """The connection may die at any byte. An EventSource only counts messages it dispatched and
    reconnects with its last event ID; the union must still be exactly once.
    live: a fresh stream on a run without events, then 6 live events;
    replay: ?since=0 on a run with 6 events."""
    run = uid("rb")
    evs = [{"kind": "progress", "data": {"done": i, "s": "é" * (i % 3)}} for i in range(1, 7)]
    if mode == "replay":
        seqs = publish_ok(dep.a, run, evs)
        st = open_sse(dep.a, run, "since=0")
        st.next_event(5)
    else:
        st = open_sse(dep.a, run)
        st.next_event(5)
        seqs = publish_ok(dep.a, run, evs)
    sse_collect(st, run, seqs[-1])
    raw = st.raw
    st.close()
    offsets = sorted(set(range(0, len(raw) + 1, 5)) |
                     {i for i in range(len(raw)) if raw[i:i + 1] == b"\n"} |
                     {i + 1 for i in range(len(raw)) if raw[i:i + 1] == b"\n"})
    bad = []
    for off in offsets:
        p = sse.SSEParser()
        items = p.feed(raw[:off])
        got = [json.loads(e.data) for e in items if isinstance(e, sse.SSEEvent)]
        got = [f["seq"] for f in got if f["type"] == "event"]
        last = p.last_event_id
        if not last and mode == "live":
            continue  # never got the state: a fresh subscribe is correct, nothing to compare
        if last:
            st2 = open_sse(dep.b, run, "", headers={"Last-Event-ID": last})
        else:
            st2 = open_sse(dep.b, run, "since=0")
        try:
            if st2.status != 200:
                bad.append((off, "status", st2.status, last))
                continue
            st2.next_event(5)
            rest = []
            # Nothing more can come once the cursor is at the head: do not wait long then.
            at_head = (got and got[-1] == seqs[-1]) or (last.isdigit() and int(last) >= seqs[-1])
            deadline = time.monotonic() + (0.3 if at_head else 5)
            while time.monotonic() < deadline and (not rest or rest[-1] < seqs[-1]):
                try:
                    ev = st2.next_event(max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
                if ev is None:
                    break
                f = json.loads(ev.data)
                if f["type"] == "event":
                    rest.append(f["seq"])
        finally:
            st2.close()
        if got + rest != seqs:
            bad.append((off, got, rest, last))
    assert not bad, f"byte cuts that lost or duplicated events: {bad[:10]}"


def test_ws_resume_many_cycles_while_publishing(dep):
    """A client cut every few frames while a publisher keeps going, alternating gateways."""
    run = uid("cy")
    cursor = 0
    got = []
    published = []
    gws = dep.gateways
    for cycle in range(8):
        published += publish_ok(dep.a, run, [progress(len(published) + i, 1000) for i in range(4)])
        c = ws(gws[cycle % len(gws)])
        subscribe(c, run, since=cursor)
        for _ in range(3):
            try:
                f = c.recv_json(2)
            except Exception:  # noqa: BLE001
                break
            if f["type"] == "event":
                assert f["seq"] > cursor
                got.append(f["seq"])
                cursor = f["seq"]
        c.abort()
    c = ws(gws[-1])
    subscribe(c, run, since=cursor)
    if cursor < published[-1]:
        got += [e["seq"] for e in collect_events(c, run, published[-1])]
    c.close()
    assert got == published


def test_replay_live_seam_under_concurrent_publishing(dep):
    """Subscribers join with `since` (and without) while a publisher keeps publishing: each gets
    every later event exactly once, in order, across the replay/live seam."""
    import random
    import threading

    run = uid("seam")
    published = []
    lock = threading.Lock()
    done = threading.Event()

    def publisher():
        for i in range(60):
            seqs = publish_ok(dep.a, run, [progress(i * 3 + j, 180) for j in range(3)])
            with lock:
                published.extend(seqs)
            time.sleep(0.01)
        done.set()

    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    subs = []
    try:
        while not done.is_set() and len(subs) < 12:
            time.sleep(random.uniform(0.02, 0.08))
            with lock:
                snapshot = list(published)
            gw = dep.gateways[len(subs) % len(dep.gateways)]
            c = ws(gw)
            if len(subs) % 3 == 2 or not snapshot:
                st = subscribe(c, run)
                cursor = st["seq"]
            else:
                cursor = random.choice([0] + snapshot)
                subscribe(c, run, since=cursor)
            subs.append((c, cursor))
        t.join(30)
        assert done.is_set(), "publisher did not finish"
        bad = []
        for c, cursor in subs:
            want = [s for s in published if s > cursor]
            got = [e["seq"] for e in collect_events(c, run, published[-1], timeout=15)] if want else []
            if got != want:
                bad.append((cursor, got[:5], want[:5], len(got), len(want)))
            c.close()
        assert not bad, f"subscribers that lost, duplicated or reordered events: {bad}"
    finally:
        done.set()

"""runcast.subscribe against real gateways: state first, every event once and in order, resume
after drops (proxy cuts, a dead path), gaps surfaced, both transports."""

from __future__ import annotations

import asyncio
import time
from typing import List

import pytest
from support import Proxy, bounded, start_embedded, transport_params, uid

import runcast

TRANSPORTS = transport_params()


async def collect(sub: runcast.Subscription, until_seq: int, timeout: float = 10.0) -> List:
    """Items until an event or gap reaches `until_seq`."""
    items: List = []

    async def run() -> None:
        async for item in sub:
            items.append(item)
            if isinstance(item, runcast.Event) and item.seq >= until_seq:
                return
            if isinstance(item, runcast.Gap) and item.to >= until_seq:
                return

    await asyncio.wait_for(run(), timeout)
    return items


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_state_first_then_every_event_in_order(dep, transport):
    run = uid("sub")

    async def main() -> None:
        async with runcast.AsyncPublisher(dep.pub, run) as p:
            before = [await p.status("queued"), await p.progress(1, 5)]
            sub = runcast.subscribe(dep.sub, run, transport=transport)
            it = sub.__aiter__()
            first = await asyncio.wait_for(it.__anext__(), 10)
            assert isinstance(first, runcast.State), first
            # On NATS a gateway's state may lag the stream by up to 1 s, so the state's seq is
            # any point up to the last publish; what follows it must fill the rest exactly.
            assert first.seq <= before[-1] and first.run == run
            assert first.status in ("running", None)
            after = []
            for i in range(2, 6):
                after.append(await p.progress(i, 5))
            after.append(await p.complete({"ok": True}))
            rest = await collect(sub, after[-1])
            await sub.aclose()
        seqs = [e.seq for e in rest]
        expected = [s for s in before + after if s > first.seq]
        assert seqs == expected, (seqs, expected)
        assert all(isinstance(e, runcast.Event) and e.run == run for e in rest)
        assert rest[-1].kind == "complete" and rest[-1].data == {"ok": True}
        assert sub.connects == 1 and sub.duplicates_dropped == 0

    bounded(main(), 30)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_since_replays_then_until_finished_stops(dep, transport):
    run = uid("since")
    with runcast.Publisher(dep.pub, run) as p:
        seqs = [p.log(f"line {i}") for i in range(5)] + [p.complete()]

    async def main() -> List:
        items = []
        async for item in runcast.subscribe(dep.sub, run, since=seqs[1], transport=transport,
                                            until_finished=True):
            items.append(item)
        return items

    items = bounded(main(), 20)
    assert isinstance(items[0], runcast.State) and items[0].seq >= seqs[-1] - 0
    assert [i.seq for i in items[1:]] == seqs[2:]
    assert [i.data.get("line") for i in items[1:-1]] == ["line 2", "line 3", "line 4"]


def test_until_finished_on_an_already_finished_run_yields_only_the_state(embedded):
    run = uid("done")
    with runcast.Publisher(embedded.url, run) as p:
        p.log("x")
        last = p.complete()

    async def main() -> List:
        return [i async for i in runcast.subscribe(embedded.url, run, until_finished=True)]

    items = bounded(main(), 10)
    assert len(items) == 1 and isinstance(items[0], runcast.State)
    assert items[0].finished and items[0].seq == last and items[0].percent == 100


def test_a_run_with_no_events_yet(embedded):
    run = uid("new")

    async def main() -> List:
        sub = runcast.subscribe(embedded.url, run)
        async with sub:
            it = sub.__aiter__()
            st = await asyncio.wait_for(it.__anext__(), 5)
            async with runcast.AsyncPublisher(embedded.url, run) as p:
                s = await p.log("first")
            ev = await asyncio.wait_for(it.__anext__(), 5)
            return [st, ev, s]

    st, ev, s = bounded(main(), 15)
    assert st.state is None and st.seq == 0 and st.status is None
    assert isinstance(ev, runcast.Event) and ev.seq == s and ev.data == {"line": "first"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_cuts_resume_exactly_once(embedded, transport):
    """A proxy resets the connection three times while a publisher keeps publishing."""
    run = uid("cut")
    proxy = Proxy(embedded.port)
    try:
        async def main() -> None:
            sub = runcast.subscribe(proxy.url, run, since=0, transport=transport,
                                    backoff=runcast.Backoff(0.05, 0.2))
            got: List[int] = []
            published: List[int] = []
            async with runcast.AsyncPublisher(embedded.url, run) as p:
                published.append(await p.status("go"))

                async def publisher() -> None:
                    for i in range(60):
                        published.append(await p.progress(i, 60))
                        await asyncio.sleep(0.01)
                    published.append(await p.complete())

                async def cutter() -> None:
                    for _ in range(3):
                        await asyncio.sleep(0.2)
                        await asyncio.get_running_loop().run_in_executor(None, proxy.cut)

                pub_task = asyncio.ensure_future(publisher())
                cut_task = asyncio.ensure_future(cutter())
                async with sub:
                    async for item in sub:
                        if isinstance(item, runcast.Event):
                            got.append(item.seq)
                            if item.kind == "complete":
                                break
                await pub_task
                await cut_task
            # since=0: every event of the run, each once, in order, whatever the cuts hit.
            assert got == published, (got, published)
            assert sub.connects >= 2, f"the cuts did not force a reconnect ({sub.connects})"

        bounded(main(), 30)
    finally:
        proxy.close()


def test_dead_path_without_fin_is_detected_by_idle_timeout(procs, workdir):
    """Bytes stop flowing (no FIN, no RST): heartbeats stop, the idle timeout reconnects, on the
    next URL of the list."""
    gw = start_embedded(procs, workdir, "--heartbeat-interval", "1s", name="hb")
    run = uid("idle")
    proxy = Proxy(gw.port)
    try:
        async def main() -> None:
            async with runcast.AsyncPublisher(gw.url, run) as p:
                first = await p.log("before")
                sub = runcast.subscribe([proxy.url, gw.url], run, since=0, idle_timeout=2.5,
                                        backoff=runcast.Backoff(0.05, 0.2))
                async with sub:
                    it = sub.__aiter__()
                    assert isinstance(await it.__anext__(), runcast.State)
                    e1 = await it.__anext__()
                    assert e1.seq == first
                    # Heartbeats arrive every second through the proxy: no spurious reconnect.
                    await asyncio.sleep(2.0)
                    assert sub.connects == 1
                    proxy.blackhole(True)
                    t0 = time.monotonic()
                    later = [await p.log(f"during {i}") for i in range(3)]
                    got = [await asyncio.wait_for(it.__anext__(), 10) for _ in range(3)]
                    took = time.monotonic() - t0
                    assert [g.seq for g in got] == later
                    assert sub.connects == 2 and sub.url.rstrip("/") == gw.url
                    assert 2.0 < took < 8, took

        bounded(main(), 30)
    finally:
        proxy.blackhole(False)
        proxy.close()


def test_gap_is_yielded_not_hidden(procs, workdir):
    gw = start_embedded(procs, workdir, "--history-events", "5", name="gap")
    run = uid("gap")
    with runcast.Publisher(gw.url, run) as p:
        seqs = [p.progress(i, 12) for i in range(12)]

    async def main() -> List:
        items = []
        async for item in runcast.subscribe(gw.url, run, since=0):
            items.append(item)
            if isinstance(item, runcast.Event) and item.seq == seqs[-1]:
                break
        return items

    items = bounded(main(), 15)
    assert isinstance(items[0], runcast.State)
    gap = items[1]
    assert isinstance(gap, runcast.Gap), items[:3]
    assert gap.from_ == 1 and gap.to == seqs[-6] and gap.message
    assert [e.seq for e in items[2:]] == seqs[-5:]


def test_several_subscribers_see_the_same_sequence(dep):
    run = uid("fan")

    async def main() -> None:
        subs = [runcast.subscribe(dep.sub, run, since=0) for _ in range(3)]
        async with runcast.AsyncPublisher(dep.pub, run) as p:
            seqs = [await p.log(f"{i}") for i in range(20)]

        async def take(s: runcast.Subscription) -> List[int]:
            items = await collect(s, seqs[-1])
            await s.aclose()
            return [i.seq for i in items if isinstance(i, runcast.Event)]

        results = await asyncio.gather(*(take(s) for s in subs))
        assert all(r == seqs for r in results), results

    bounded(main(), 20)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_message_over_the_limit_raises_instead_of_looping(embedded, transport):
    run = uid("big")
    with runcast.Publisher(embedded.url, run) as p:
        p.log("x" * 100_000)

    async def main() -> None:
        with pytest.raises(runcast.ProtocolError):
            async for _ in runcast.subscribe(embedded.url, run, since=0, transport=transport,
                                             max_message_bytes=64 * 1024):
                pass

    bounded(main(), 10)

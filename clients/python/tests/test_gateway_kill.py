"""A gateway is SIGKILLed in the middle of a subscription on NATS: the subscription continues on
the other gateway of its URL list, and every event arrives exactly once, in order.

Design: the client gets both gateways' URLs (`subscribe([a, b], run)`); it starts on the first,
and after a drop moves to the next. The worker publishes straight to NATS (NatsPublisher), so
publishing does not depend on either gateway, and the JetStream acks give the exact list of seqs
the subscriber must see.
"""

from __future__ import annotations

import asyncio
import time
from typing import List, Optional

import pytest
from support import FIGURES, bounded, start_nats_gateway, transport_params, uid

import runcast

pytest.importorskip("nats")

N_EVENTS = 300
KILL_AFTER = 100


@pytest.mark.parametrize("transport", transport_params())
def test_sigkill_during_subscribe_continues_exactly_once(procs, workdir, nats_server, transport):
    a = start_nats_gateway(procs, workdir, nats_server.url, name=f"kill-a-{transport}")
    b = start_nats_gateway(procs, workdir, nats_server.url, name=f"kill-b-{transport}")
    run = uid("kill")
    published: List[int] = []
    received: List[int] = []
    times: List[float] = []
    marks = {"kill": 0.0, "resumed_at": 0.0}

    async def main() -> None:
        sub = runcast.subscribe([a.url, b.url], run, transport=transport)
        killed = asyncio.Event()

        async def worker() -> None:
            async with runcast.NatsPublisher(nats_server.url, run) as p:
                published.append(await p.status("running"))
                for i in range(N_EVENTS):
                    published.append(await p.progress(i + 1, N_EVENTS))
                    # Publish steadily through the kill: ~3 ms apart, ~1 s in all.
                    await asyncio.sleep(0.003)
                await killed.wait()
                published.append(await p.complete({"events": N_EVENTS}))

        async def kill() -> None:
            loop = asyncio.get_running_loop()
            marks["kill"] = time.monotonic()
            await loop.run_in_executor(None, a.proc.kill)
            killed.set()

        it = sub.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 10)
        assert isinstance(first, runcast.State) and first.seq == 0
        assert sub.url.rstrip("/") == a.url
        wtask = asyncio.ensure_future(worker())
        ktask: Optional[asyncio.Future] = None
        try:
            while True:
                item = await asyncio.wait_for(it.__anext__(), 15)
                assert isinstance(item, runcast.Event), item
                received.append(item.seq)
                times.append(time.monotonic())
                if len(received) == KILL_AFTER and ktask is None:
                    ktask = asyncio.ensure_future(kill())
                if item.kind == "complete":
                    break
            await wtask
            if ktask is not None:
                await ktask
        finally:
            marks["resumed_at"] = sub.connected_at or 0.0
            await sub.aclose()
            wtask.cancel()
        assert sub.url.rstrip("/") == b.url, f"did not move to the other gateway ({sub.url})"
        assert sub.connects == 2, sub.connects
        pause = max(t2 - t1 for t1, t2 in zip(times, times[1:]))
        FIGURES[f"kill test [{transport}]"] = (
            f"{len(received)} events, killed after {KILL_AFTER}; reconnected (state on the "
            f"other gateway) {1000 * (marks['resumed_at'] - marks['kill']):.0f} ms after SIGKILL; "
            f"longest pause between two events {1000 * pause:.0f} ms; duplicates dropped by the "
            f"client: {sub.duplicates_dropped}")

    bounded(main(), 40)
    assert not a.proc.alive()
    # Exactly once, in order: the subscriber's seqs are the acks' seqs, no more, no less.
    assert received == published, (
        f"missing {sorted(set(published) - set(received))[:10]}, "
        f"extra {sorted(set(received) - set(published))[:10]}")
    b.stop()

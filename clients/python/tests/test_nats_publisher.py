"""NatsPublisher against a real nats-server with JetStream and two gateways."""

from __future__ import annotations

import pytest
from support import bounded, history, uid

import runcast

nats = pytest.importorskip("nats")


def test_every_kind_acked_with_the_seq_subscribers_see(nats_server, nats_pair):
    a, b = nats_pair
    run = uid("nats")

    async def main() -> None:
        async with runcast.NatsPublisher(nats_server.url, run) as p:
            seqs = [await p.status("scanning"), await p.progress(3, 10), await p.log("shard 3"),
                    await p.publish("finding", {"severity": "low"}),
                    await p.complete({"findings": 1})]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        items = [i async for i in runcast.subscribe(b.url, run, since=0, until_finished=True)]
        assert isinstance(items[0], runcast.State)
        evs = items[1:]
        assert [e.seq for e in evs] == seqs
        assert [(e.kind, e.data) for e in evs] == [
            ("status", {"state": "scanning"}), ("progress", {"done": 3, "total": 10}),
            ("log", {"line": "shard 3"}), ("finding", {"severity": "low"}),
            ("complete", {"findings": 1})]

    bounded(main(), 20)
    assert [e["seq"] for e in history(a.url, run)] == [e["seq"] for e in history(b.url, run)]


def test_same_id_is_stored_once_and_shared_with_the_http_api(nats_server, nats_pair):
    a, _ = nats_pair
    run = uid("natsid")

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            p = runcast.NatsPublisher(nc, run)  # a connection we own: close() leaves it open
            s1 = await p.publish("log", {"line": "once"}, id="step-1")
            s2 = await p.publish("log", {"line": "once"}, id="step-1")
            assert s1 == s2
            # The gateway scopes an HTTP event id the same way (`<run>/<id>`), so the same id
            # through the HTTP API is the same event.
            async with runcast.AsyncPublisher(a.url, run) as hp:
                s3 = await hp.publish("log", {"line": "once"}, id="step-1")
            assert s3 == s1
            await p.close()
            assert nc.is_connected
        finally:
            await nc.close()

    bounded(main(), 20)
    assert len(history(a.url, run)) == 1


def test_client_side_checks(nats_server):
    with pytest.raises(runcast.InvalidRequestError):
        runcast.NatsPublisher(nats_server.url, "a.b")  # would be another subject

    async def main() -> None:
        async with runcast.NatsPublisher(nats_server.url, uid("deep")) as p:
            deep: object = {}
            for _ in range(65):
                deep = {"d": deep}
            with pytest.raises(runcast.InvalidRequestError) as e:
                await p.publish("log", deep)
            assert e.value.code == "data_too_deep"
            with pytest.raises(runcast.InvalidRequestError):
                await p.publish("Not.A.Kind", {})

    bounded(main(), 10)


def test_no_stream_is_a_bounded_transport_error(nats_server):
    async def main() -> None:
        # A prefix no stream captures: JetStream has no responder; retried, then reported.
        async with runcast.NatsPublisher(nats_server.url, uid("nostream"), prefix="elsewhere",
                                         max_attempts=2, timeout=1,
                                         backoff=runcast.Backoff(0.05, 0.1)) as p:
            with pytest.raises(runcast.TransportError) as e:
                await p.log("x")
            assert e.value.maybe_stored is False and e.value.idempotency_key

    bounded(main(), 15)

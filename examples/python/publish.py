#!/usr/bin/env python3
"""Publishes a run's progress to runcast from Python, with the official NATS
client (pip install nats-py). This is the whole contract for a worker in any
language: JSON data on <prefix>.runs.<run>.<kind>, through JetStream so every
event is acknowledged, with a Nats-Msg-Id so a retried publish is stored once.

    python3 publish.py nats://127.0.0.1:4222 nightly-scan 20
"""
import asyncio
import json
import sys
import uuid

import nats


async def main(url: str, run: str, total: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def publish(kind: str, data: dict) -> int:
        subject = f"runcast.runs.{run}.{kind}"
        # One id per event, reused if this publish is retried.
        headers = {"Nats-Msg-Id": str(uuid.uuid4())}
        ack = await js.publish(subject, json.dumps(data).encode(), headers=headers, timeout=5)
        return ack.seq

    await publish("status", {"state": "scanning"})
    for done in range(1, total + 1):
        await publish("progress", {"done": done, "total": total})
        await publish("log", {"line": f"scanned shard {done}"})
    seq = await publish("complete", {"findings": 0})
    print(seq)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

"""Workload ``status``: how long ``calmrun status RUN`` takes to find one run's events among many.

The events topic gets N other runs' events (one realistic record each, keyed by run ID, on its run's
partition), then one real run's full history at the end, as the newest run of a busy system. Timed:

* ``decode all``: what ``calmrun status`` did before: decode every record of the run's partition, keep
  the run's own;
* ``key filter``: skip other keys before decoding, read the whole partition (the fallback when a client
  clock was far ahead);
* ``from request time``: ``Client.run_events`` as ``calmrun status`` uses it now: seek by time to shortly
  before the run was requested, skip other keys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.common import PARTITIONS, Ctx, summary
from calmrun.client import Client
from calmrun.kafka.topics import Topics, create_topics, partition_for
from calmrun.settings import load_settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent
from calmrun.workflow.state import RunState


def _event(run_id: str, seq: int, type_: str, at_ms: int) -> RunEvent:
    return RunEvent(
        run_id=run_id,
        seq=seq,
        type=type_,  # type: ignore[arg-type]
        at_ms=at_ms,
        workflow="bench",
        version="v1",
        step="s1" if "step" in type_ else None,
        attempt=1 if "step" in type_ else None,
        data={"input": {"n": seq}, "agent": "bench_step"},
    )


async def run(ctx: Ctx) -> dict[str, Any]:
    n = ctx.n(1_000_000, 20_000)
    pfx = f"bstat{time.time_ns() % 10**9}"
    settings = load_settings(kafka={"bootstrap": ctx.bootstrap, "prefix": pfx, "partitions": PARTITIONS})
    topics = Topics(pfx)
    await create_topics(settings.kafka, {topics.events: {}, topics.state: {"cleanup.policy": "compact"}})
    codec = RecordCodec(wire_models())
    template = codec.encode(_event("other", 1, "run.requested", 0))
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        futures = []
        for i in range(n):
            key = f"other-{i}"
            futures.append(
                await producer.send(topics.events, template, key=key.encode(), partition=i % PARTITIONS)
            )
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures = []
        await asyncio.gather(*futures)
        await asyncio.sleep(1.0)  # the run below is requested after every other record's timestamp
        rid = "the-run"
        p = partition_for(rid, PARTITIONS)
        created = time.time_ns() // 1_000_000
        types = ["run.requested", "step.scheduled", "step.succeeded", "run.routed", "run.completed"]
        for seq, t in enumerate(types, start=1):
            ev = _event(rid, seq, t, created)
            await producer.send_and_wait(topics.events, codec.encode(ev), key=rid.encode(), partition=p)
        state = RunState(run_id=rid, workflow="bench", version="v1", seq=len(types), created_ms=created)
        await producer.send_and_wait(topics.state, codec.encode(state), key=rid.encode(), partition=p)
    finally:
        await producer.stop()
    fill_s = time.perf_counter() - t0

    timings: dict[str, list[float]] = {"decode all": [], "key filter": [], "from request time": []}
    async with Client(settings) as client:
        for _ in range(ctx.rounds):
            t = time.perf_counter()
            old = [
                ev async for key, ev in client._read(topics.events, RunEvent, partitions=[p]) if key == rid
            ]
            timings["decode all"].append(time.perf_counter() - t)
            t = time.perf_counter()
            keyed = await client.events(rid)
            timings["key filter"].append(time.perf_counter() - t)
            t = time.perf_counter()
            st = await client.state(rid)
            assert st is not None
            now = await client.run_events(st)
            timings["from request time"].append(time.perf_counter() - t)
            if not (old == keyed == now) or len(now) != len(types):
                raise RuntimeError(f"the three reads disagree: {len(old)}, {len(keyed)}, {len(now)} events")
    metrics = {f"{k} s": summary(v) for k, v in timings.items()}
    return {
        "params": {"other_runs_events": n, "records_in_the_runs_partition": n // PARTITIONS + len(types)},
        "metrics": {**metrics, "fill s": summary([fill_s])},
        "notes": ["'from request time' includes reading the run's state (its created_ms) first"],
    }

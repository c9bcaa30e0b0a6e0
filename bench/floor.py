"""Workload 1, the floor: raw keyed consume -> produce forwarders (aiokafka, confluent-kafka).

Records have the size of the workflow's step tasks and the topics its partition count. Throughput: a
forwarder process drains a preloaded backlog of N records. Per-hop latency: records sent at a light,
paced rate carry their send time; the forwarder measures send -> consumed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.common import PARTITIONS, Ctx, create_topics, prefix, proc, summary
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import StepTask


def step_record_size() -> int:
    """Bytes of a representative step task of the benchmark workflow, as the worker encodes it."""
    task = StepTask(
        run_id="bench-r00-000001",
        workflow="lin",
        version="1",
        step="s2",
        attempt=1,
        agent="bench_step",
        input={"n": 2},
        issued_ms=time.time_ns() // 1_000_000,
        timeout_s=60.0,
    )
    return len(RecordCodec(wire_models()).encode(task))


async def preload(bootstrap: str, topic: str, count: int, size: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        value = b"v" * size
        futures = [
            await producer.send(topic, value, key=f"run-{i:07d}".encode(), partition=i % PARTITIONS)
            for i in range(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def paced(bootstrap: str, topic: str, count: int, size: int, rate: float) -> None:
    """Send ``count`` records at ``rate``/s, each with its send time (ns) in the ``t`` header."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        value = b"v" * size
        t0 = time.monotonic()
        futures = []
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(
                await producer.send(
                    topic,
                    value,
                    key=f"run-{i:07d}".encode(),
                    partition=i % PARTITIONS,
                    headers=[("t", str(time.time_ns()).encode())],
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def forward_rate(ctx: Ctx, client: str, count: int, size: int) -> tuple[float, float]:
    p = prefix("floor")
    src, dst = f"{p}.in", f"{p}.out"
    await create_topics(ctx.bootstrap, [src, dst])
    await preload(ctx.bootstrap, src, count, size)
    args = [
        "--client",
        client,
        "--bootstrap",
        ctx.bootstrap,
        "--src",
        src,
        "--dst",
        dst,
        "--count",
        str(count),
    ]
    async with proc("bench.forward", args, ctx.out / f".{p}.json") as fwd:
        st = await fwd.wait_for(lambda s: s.get("state") == "done", 300, f"{client} forwarder")
    return float(st["rate"]), float(st["cpu_us_per_record"])


async def forward_latency(ctx: Ctx, client: str, count: int, size: int, rate: float) -> dict[str, float]:
    p = prefix("flat")
    src, dst = f"{p}.in", f"{p}.out"
    await create_topics(ctx.bootstrap, [src, dst])
    args = ["--client", client, "--bootstrap", ctx.bootstrap, "--src", src, "--dst", dst, "--latency"]
    async with proc("bench.forward", args, ctx.out / f".{p}.json") as fwd:
        await fwd.wait_for(lambda s: s.get("state") == "ready", 60, f"{client} forwarder")
        await asyncio.sleep(0.5)  # let its first fetch reach the broker (not synchronisation: a warm-up)
        await paced(ctx.bootstrap, src, count, size, rate)
        await fwd.wait_for(lambda s: s.get("hops", 0) >= count, 60, f"{client} forwarder to see every record")
        st = await fwd.stop()
    if st.get("hops", 0) < count:
        raise RuntimeError(f"{client} forwarder saw {st.get('hops')} of {count} timed records")
    return {"p50_ms": float(st["p50_ms"]), "p99_ms": float(st["p99_ms"])}


async def run(ctx: Ctx) -> dict[str, Any]:
    size = step_record_size()
    count = ctx.n(200_000, 2_000)
    lat_count, lat_rate = ctx.n(3_000, 100), 500.0
    clients = ["aiokafka"] + ([] if ctx.skip_confluent else ["confluent"])
    metrics: dict[str, Any] = {}
    for client in clients:
        c = count * (2 if client == "confluent" and not ctx.quick else 1)
        await forward_rate(ctx, client, max(c // 10, 500), size)  # warm-up
        rates = [await forward_rate(ctx, client, c, size) for _ in range(ctx.rounds)]
        lats = [await forward_latency(ctx, client, lat_count, size, lat_rate) for _ in range(ctx.rounds)]
        metrics[f"{client} records/s"] = summary([r for r, _ in rates])
        metrics[f"{client} CPU us/record"] = summary([c for _, c in rates])
        metrics[f"{client} hop p50 ms"] = summary([x["p50_ms"] for x in lats])
        metrics[f"{client} hop p99 ms"] = summary([x["p99_ms"] for x in lats])
    return {
        "params": {
            "record_bytes": size,
            "partitions": PARTITIONS,
            "records": count,
            "latency_records": lat_count,
            "latency_rate_per_s": lat_rate,
            "producer": "acks=all, idempotence, linger 5 ms (the worker's)",
            "confluent": "fetch.queue.backoff.ms=1"
            if not ctx.skip_confluent
            else "skipped (--skip-confluent)",
        },
        "metrics": metrics,
    }

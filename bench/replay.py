"""Workloads 5 and 6: offset replay, recorded replay, and the cost fold over recorded events.

* ``replay``: ``calmrun.replay.replay_offsets`` of a topic holding N run requests into a shadow namespace
  (records/s, as the replay reports it), and ``replay_recorded_many`` of M recorded runs of the benchmark
  workflow (runs/s of re-deciding; reading the snapshots from Kafka is reported apart).
* ``costs``: ``calmrun.costs.fold.PartitionFold`` (the aggregator's fold, in memory) applied to the
  recorded events of M runs: events/s, Avro decoding included and not. Kafka is not part of this number
  (the ``aggregator`` workload measures the whole aggregator).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from bench.common import PARTITIONS, Ctx, summary
from bench.driver import WORKFLOW, start_worker
from bench.memory import submit_requests
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics, ensure_topics
from calmrun.settings import load_settings
from calmrun.wire.codec import RecordCodec, wire_models
from tests.runtime_support import linear


async def _recorded(ctx: Ctx, name: str, n: int) -> str:
    """Run ``n`` runs of the benchmark workflow to completion; returns their prefix."""
    worker, pfx = await start_worker(ctx, name, max_in_flight=100)
    try:
        await submit_requests(ctx.bootstrap, pfx, n, tag=name)
        await worker.wait_for(lambda s: s["stats"]["completed"] >= n, 900, f"{n} runs to complete")
        await worker.stop()
        return pfx
    finally:
        worker.kill()


async def _offset_replay(ctx: Ctx, n: int) -> float:
    from calmrun.replay import replay_offsets

    pfx = f"brepl{time.time_ns() % 10**9}"
    settings = load_settings(kafka={"bootstrap": ctx.bootstrap, "prefix": pfx, "partitions": PARTITIONS})
    await ensure_topics(settings.kafka, [linear(WORKFLOW, 3, agent="bench_step")])
    await submit_requests(ctx.bootstrap, pfx, n, tag="off")
    shadow = f"{pfx}sh"
    shadow_settings = load_settings(
        kafka={"bootstrap": ctx.bootstrap, "prefix": shadow, "partitions": PARTITIONS}
    )
    await ensure_topics(shadow_settings.kafka, [linear(WORKFLOW, 3, agent="bench_step")])
    report = await replay_offsets(settings, "runs.requests", into=f"shadow:{shadow}", from_offset=0)
    if report.replayed != n:
        raise RuntimeError(f"offset replay moved {report.replayed} of {n} records")
    return report.rate


async def _recorded_replay(ctx: Ctx, pfx: str, n: int) -> tuple[float, float]:
    from calmrun.replay import fetch_snapshots, replay_recorded_many

    settings = load_settings(kafka={"bootstrap": ctx.bootstrap, "prefix": pfx, "partitions": PARTITIONS})
    t0 = time.perf_counter()
    snaps = await fetch_snapshots(settings, workflow=WORKFLOW)
    fetch_s = time.perf_counter() - t0
    if len(snaps) < n:
        raise RuntimeError(f"{len(snaps)} of {n} runs recorded")
    batch = replay_recorded_many([linear(WORKFLOW, 3, agent="bench_step")], snaps)
    if batch.converged != len(snaps):
        raise RuntimeError(f"recorded replay: {batch.diverged} diverged, {batch.errors} errors")
    return batch.runs_per_s, len(snaps) / fetch_s


async def run_replay(ctx: Ctx) -> dict[str, Any]:
    n_off, n_runs = ctx.n(100_000, 500), ctx.n(10_000, 30)
    await _offset_replay(ctx, max(n_off // 10, 100))  # warm-up
    off = [await _offset_replay(ctx, n_off) for _ in range(ctx.rounds)]
    pfx = await _recorded(ctx, "rec", n_runs)
    await _recorded_replay(ctx, pfx, n_runs)  # warm-up
    rec = [await _recorded_replay(ctx, pfx, n_runs) for _ in range(ctx.rounds)]
    return {
        "params": {"offset_records": n_off, "recorded_runs": n_runs},
        "metrics": {
            "offset replay records/s": summary(off),
            "recorded replay runs/s (re-deciding)": summary([r for r, _ in rec]),
            "snapshots read runs/s (from Kafka)": summary([f for _, f in rec]),
        },
    }


async def _events(ctx: Ctx, pfx: str) -> list[tuple[int, int, bytes]]:
    topic = Topics(pfx).events
    consumer = AIOKafkaConsumer(bootstrap_servers=ctx.bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, int, bytes]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        async for r in read_to_end(consumer, tps):
            if r.value is not None:
                out.append((r.partition, r.offset, r.value))
        return out
    finally:
        await consumer.stop()


def _fold(raw: list[tuple[int, int, bytes]], decoded: list[dict[str, Any]] | None) -> tuple[float, float]:
    from calmrun.costs.app import retention_ms
    from calmrun.costs.fold import PartitionFold

    avro = RecordCodec(wire_models()).avro
    folds = {p: PartitionFold(p, retention_ms(load_settings())) for p in range(PARTITIONS)}
    t0 = time.perf_counter()
    if decoded is None:
        for p, off, value in raw:
            folds[p].apply(avro.decode(value)[1], off)
    else:
        for (p, off, _), ev in zip(raw, decoded, strict=True):
            folds[p].apply(ev, off)
    return len(raw) / (time.perf_counter() - t0), sum(f.counted for f in folds.values())


async def run_costs(ctx: Ctx) -> dict[str, Any]:
    n_runs = ctx.n(3_000, 30)
    pfx = await _recorded(ctx, "cost", n_runs)
    raw = await _events(ctx, pfx)
    codec = RecordCodec(wire_models())
    decoded = [codec.avro.decode(v)[1] for _, _, v in raw]
    await asyncio.sleep(0)
    _fold(raw, decoded)  # warm-up
    with_decode = [_fold(raw, None) for _ in range(ctx.rounds)]
    fold_only = [_fold(raw, decoded) for _ in range(ctx.rounds)]
    return {
        "params": {"runs": n_runs, "events": len(raw), "attempts_counted": int(fold_only[0][1])},
        "metrics": {
            "cost fold events/s (decoded events)": summary([r for r, _ in fold_only]),
            "cost fold events/s (with Avro decode)": summary([r for r, _ in with_decode]),
        },
        "notes": [
            "cost aggregation: calmrun.costs.fold.PartitionFold in memory; the aggregator with Kafka is the "
            "'aggregator' workload"
        ],
    }

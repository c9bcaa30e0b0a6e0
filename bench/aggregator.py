"""Workload 7, ``aggregator``: the cost aggregator (``calmrun.costs.app``) with Kafka, on the bench's events.

* flood: an aggregator runs on the prefix while a worker takes a flood of N runs of the benchmark workflow
  (20,000 in the full bench; the bench's own event mix, 11 audit events per run); measured: the largest
  lag seen during the flood and the seconds from the flood's last event to a lag of zero.
* backlog: the same events copied (raw bytes) into a fresh prefix, then a fresh aggregator started: events
  folded per second from its first committed batch to the end, and a check that its totals cover the topic.

Lag and coverage are read from the aggregator's consumer group offsets, which each batch's transaction
commits together with its totals. ``python -m bench.aggregator --runs N`` runs the backlog part alone on a
synthetic mix (no worker); ``--flood N`` the flood and then the backlog of its events. Both start the
project's broker when no ``--bootstrap`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from bench.common import PARTITIONS, Ctx, cpu_s, on_a_broker, summary
from calmrun.costs.costtopics import CostTopics, ensure_cost_topics
from calmrun.costs.process import AggregatorProcess
from calmrun.costs.totals import read_current
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import partition_for
from calmrun.settings import Settings, load_settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, StepCost

Raw = list[tuple[int, bytes, bytes]]  # (partition, key, value)


def settings_for(bootstrap: str, pfx: str) -> Settings:
    return load_settings(
        kafka={"bootstrap": bootstrap, "prefix": pfx, "partitions": PARTITIONS},
        costs={"session_timeout_s": 6},
    )


def workload(runs: int, t0: int) -> list[RunEvent]:
    """A synthetic mix: 8 events per run, 3 of them priced attempts, re-sent copies for every third run."""
    out: list[RunEvent] = []
    for i in range(runs):
        base = {"run_id": f"run-{i:06d}", "workflow": f"wf{i % 3}", "tenant": f"t{i % 5}"}
        at = t0 + i * 20

        def cost(k: int) -> StepCost:
            return StepCost(
                latency_ms=5.0 + k,
                queue_wait_ms=1.0,
                tokens_in=200 + k,
                tokens_out=20,
                requests=1,
                api_calls=1,
                model=("fast", "smart")[k % 2],
                cost_usd=Decimal("0.00021") * (k + 1),
            )

        ev = [
            RunEvent(**base, seq=1, type="run.requested", at_ms=at),
            RunEvent(
                **base, seq=2, type="step.scheduled", at_ms=at, step="a", attempt=1, data={"agent": "x"}
            ),
            RunEvent(**base, seq=3, type="step.succeeded", at_ms=at + 3, step="a", attempt=1, cost=cost(0)),
            RunEvent(
                **base, seq=4, type="step.scheduled", at_ms=at + 3, step="b", attempt=1, data={"agent": "y"}
            ),
            RunEvent(**base, seq=5, type="step.failed", at_ms=at + 6, step="b", attempt=1, cost=cost(1)),
            RunEvent(
                **base, seq=6, type="step.scheduled", at_ms=at + 6, step="b", attempt=2, data={"agent": "y"}
            ),
            RunEvent(**base, seq=7, type="step.succeeded", at_ms=at + 9, step="b", attempt=2, cost=cost(2)),
            RunEvent(**base, seq=8, type="run.completed", at_ms=at + 9),
        ]
        out += ev
        if i % 3 == 0:
            out += ev[2:5]
    return out


def encode(events: list[RunEvent]) -> Raw:
    codec = RecordCodec(wire_models())
    return [(partition_for(e.run_id, PARTITIONS), e.run_id.encode(), codec.encode(e)) for e in events]


async def produce_in_transactions(bootstrap: str, pfx: str, raw: Raw, size: int) -> None:
    """Write ``raw`` in transactions of ``size`` records, as a transactional worker does (a marker each)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"{pfx}.bench-writer",
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        topic = CostTopics(pfx).events
        for i in range(0, len(raw), size):
            async with producer.transaction():
                for p, key, value in raw[i : i + size]:
                    await producer.send(topic, value, key=key, partition=p)
    finally:
        await producer.stop()


async def produce(bootstrap: str, pfx: str, raw: Raw) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        topic = CostTopics(pfx).events
        futs = [await producer.send(topic, value, key=key, partition=p) for p, key, value in raw]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def read_raw(bootstrap: str, pfx: str) -> Raw:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(CostTopics(pfx).events, p) for p in range(PARTITIONS)]
        return [(r.partition, r.key or b"", r.value or b"") async for r in read_to_end(consumer, tps)]
    finally:
        await consumer.stop()


async def _offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def _ends(consumer: AIOKafkaConsumer, topic: str) -> int:
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return sum((await consumer.end_offsets(tps)).values())


async def _covered(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:  # the group (or the offsets topic of a fresh broker) does not exist yet
        return 0
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def backlog(bootstrap: str, raw: Raw, log: Path, transactions: int = 0) -> dict[str, float]:
    """Copy ``raw`` into a fresh prefix (in transactions of that many records when given), start an
    aggregator, time it to the end; check its coverage."""
    pfx = f"bagg{uuid.uuid4().hex[:8]}"
    settings = settings_for(bootstrap, pfx)
    await ensure_cost_topics(settings)
    if transactions:
        await produce_in_transactions(bootstrap, pfx, raw, transactions)
    else:
        await produce(bootstrap, pfx, raw)
    total = sum((await _offsets(bootstrap, CostTopics(pfx).events)).values())
    topics = CostTopics(pfx)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with AggregatorProcess(settings, log=log) as agg:
            t_start = time.perf_counter()
            first: tuple[float, int] | None = None
            cpu0 = 0.0
            while True:
                n = await _covered(admin, topics.group(settings), topics.events)
                now = time.perf_counter()
                if n > 0 and first is None:
                    first, cpu0 = (now, n), cpu_s(agg.pid)
                if n >= total:
                    break
                if now - t_start > 600:
                    raise RuntimeError(f"aggregator did not finish in 600s ({n}/{total}); log: {log}")
                await asyncio.sleep(0.02)
            assert first is not None
            span, cpu = now - first[0], cpu_s(agg.pid) - cpu0
            _, cov = await read_current(settings, wait=True, wait_s=60)
            if cov.lag:
                raise RuntimeError(f"aggregator coverage still {cov.lag} events behind")
    finally:
        await admin.close()
    return {
        "events": float(len(raw)),
        # offsets include transaction markers: events are len(raw) of the total offsets
        "events_per_s": (total - first[1]) * len(raw) / total / span if span > 0 else float("inf"),
        "events_per_cpu_s": (total - first[1]) * len(raw) / total / cpu if cpu > 0 else float("inf"),
        "start_s": first[0] - t_start,
    }


async def flood(ctx: Ctx, n_runs: int) -> tuple[str, dict[str, float]]:
    """An aggregator on a worker's prefix while the worker takes ``n_runs`` at once; lag after the flood."""
    from bench.driver import start_worker
    from bench.memory import submit_requests

    worker, pfx = await start_worker(ctx, "aggfl", max_in_flight=1000)
    settings = settings_for(ctx.bootstrap, pfx)
    topics = CostTopics(pfx)
    admin = AIOKafkaAdminClient(bootstrap_servers=ctx.bootstrap)
    ends = AIOKafkaConsumer(bootstrap_servers=ctx.bootstrap, isolation_level="read_committed")
    await admin.start()
    await ends.start()
    try:
        with AggregatorProcess(settings, log=ctx.out / f".{pfx}.agg.log"):
            await read_current(settings, wait=True, wait_s=60)  # the aggregator is up and owns its partitions
            await submit_requests(ctx.bootstrap, pfx, n_runs, tag="agg")
            max_lag, done_at = 0, None
            while True:
                end = await _ends(ends, topics.events)
                lag = end - await _covered(admin, topics.group(settings), topics.events)
                max_lag = max(max_lag, lag)
                st = worker.status()
                if done_at is None and st and st["stats"]["completed"] >= n_runs:
                    done_at, final_end = time.perf_counter(), end
                if done_at is not None:
                    if await _covered(admin, topics.group(settings), topics.events) >= final_end:
                        zero_s = time.perf_counter() - done_at
                        break
                    if time.perf_counter() - done_at > 300:
                        raise RuntimeError(f"aggregator lag did not return to zero in 300s (lag {lag})")
                worker.check()
                await asyncio.sleep(0.05)
        await worker.stop()
    finally:
        worker.kill()
        await ends.stop()
        await admin.close()
    return pfx, {
        "max_lag_events": float(max_lag),
        "lag_zero_after_flood_s": zero_s,
        "events": float(final_end),
    }


async def run(ctx: Ctx) -> dict[str, Any]:
    n_runs = ctx.n(20_000, 30)
    pfx, fl = await flood(ctx, n_runs)
    raw = await read_raw(ctx.bootstrap, pfx)
    rounds = [await backlog(ctx.bootstrap, raw, ctx.out / f".bagg{i}.log") for i in range(ctx.rounds)]
    return {
        "params": {"flood_runs": n_runs, "events": len(raw), "events_per_run": round(len(raw) / n_runs, 1)},
        "metrics": {
            "aggregator backlog events/s (with Kafka, transactions)": summary(
                [r["events_per_s"] for r in rounds]
            ),
            "aggregator backlog events per CPU second of its process": summary(
                [r["events_per_cpu_s"] for r in rounds]
            ),
            "aggregator lag max during the flood (events)": summary([fl["max_lag_events"]]),
            "aggregator lag back to zero after the flood (s)": summary([fl["lag_zero_after_flood_s"]]),
        },
        "notes": [
            "flood: the worker's events of N runs submitted at once, the aggregator running alongside; "
            "backlog: the same events copied to a fresh prefix, then a fresh aggregator; "
            "events/s from its first committed batch to the end"
        ],
    }


async def _standalone(bootstrap: str, runs: int, flood_runs: int, transactions: int) -> None:
    if flood_runs:
        ctx = Ctx(bootstrap=bootstrap, out=Path(tempfile.mkdtemp(prefix="calmrun-costs-flood-")))
        pfx, fl = await flood(ctx, flood_runs)
        raw = await read_raw(bootstrap, pfx)
        print(
            f"flood: {flood_runs} runs of the bench workflow at once ({len(raw)} events, "
            f"{len(raw) / flood_runs:.1f} per run), the aggregator alongside: largest lag seen "
            f"{fl['max_lag_events']:,.0f} events; lag back to zero {fl['lag_zero_after_flood_s']:.2f}s "
            f"after the worker completed the last run (load average {os.getloadavg()[0]:.1f})"
        )
        r = await backlog(bootstrap, raw, ctx.out / "backlog.log")
        print(
            f"backlog of those events, fresh aggregator: {r['events_per_s']:,.0f} events/s "
            f"({r['events_per_cpu_s']:,.0f} per CPU second of the aggregator; load average "
            f"{os.getloadavg()[0]:.1f})"
        )
        return
    raw = encode(workload(runs, 1_750_000_000_000))
    log = Path(tempfile.mkdtemp(prefix="calmrun-costs-bench-")) / "aggregator.log"
    r = await backlog(bootstrap, raw, log, transactions)
    print(
        f"aggregator (aiokafka, transactions, {PARTITIONS} partitions, real broker): {len(raw)} events "
        f"({runs} runs, synthetic mix"
        + (f", written in transactions of {transactions}" if transactions else "")
        + f"); first batch committed {r['start_s']:.1f}s after start; "
        f"{r['events_per_s']:,.0f} events/s from then to the end ({r['events_per_cpu_s']:,.0f} per CPU "
        f"second of the aggregator; load average {os.getloadavg()[0]:.1f}); coverage reached the topic's end"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--flood", type=int, default=0, help="instead: the flood part with this many runs")
    parser.add_argument("--transactions", type=int, default=0, help="write the events in transactions of N")
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    on_a_broker(args.bootstrap, lambda b: _standalone(b, args.runs, args.flood, args.transactions), "costs")


if __name__ == "__main__":
    main()

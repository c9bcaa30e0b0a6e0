"""Measure the cost aggregator's throughput (events per second) on this machine.

``python -m calmrun.costs.throughput [--runs N] [--bootstrap B]``: writes N runs' worth of events (8 events
per run, 3 of them attempts with a cost, plus re-sent copies for every third run) to a fresh prefix, starts
the aggregator (``python -m calmrun.costs.aggregator``), and times its committed offsets from its first commit
to the end of the topic; then checks its totals against the reference fold. Also times the fold alone on a
dict (no Kafka, no faust). Starts the project's KRaft broker when no ``--bootstrap`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from calmrun.codec import RecordCodec, wire_models
from calmrun.connect import client_kwargs
from calmrun.costs.aggregator import AggregatorProcess, CostFold, CostTopics, ensure_cost_topics
from calmrun.costs.totals import fold_locally, read_events, wait_totals
from calmrun.settings import Settings, load_settings
from calmrun.streams.topics import partition_for
from calmrun.workflow.events import RunEvent, StepCost


def workload(runs: int, t0: int) -> list[RunEvent]:
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


async def produce(settings: Settings, events: list[RunEvent]) -> None:
    codec = RecordCodec(wire_models())
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=20, **client_kwargs(settings.kafka)
    )
    await producer.start()
    try:
        topic = CostTopics(settings.kafka.prefix).events
        for e in events:
            p = partition_for(e.run_id, settings.kafka.partitions)
            await producer.send(topic, codec.encode(e), key=e.run_id.encode(), partition=p)
        await producer.flush()
    finally:
        await producer.stop()


async def committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def measure(bootstrap: str, runs: int) -> None:
    prefix = f"tp{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        kafka={"bootstrap": bootstrap, "prefix": prefix},
        costs={"commit_interval_s": 0.5, "emit_interval_s": 0.5, "session_timeout_s": 6},
    )
    await ensure_cost_topics(settings)
    events = workload(runs, 1_750_000_000_000)
    await produce(settings, events)
    total = len(events)

    fold = CostFold({}, {"1m": 10**12, "1h": 10**12, "1d": 10**12})
    t = time.perf_counter()
    for i, e in enumerate(events):
        fold.apply(e, partition_for(e.run_id, 4), i)
    fold_s = time.perf_counter() - t
    print(f"fold alone (dict, no Kafka): {total} events in {fold_s:.2f}s = {total / fold_s:,.0f} events/s")

    topics = CostTopics(prefix)
    group = topics.app_id(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs(settings.kafka))
    await admin.start()
    log = Path(tempfile.mkdtemp(prefix="calmrun-costs-bench-")) / "aggregator.log"
    try:
        with AggregatorProcess(settings, log=log):
            t_start = time.perf_counter()
            first: tuple[float, int] | None = None
            while True:
                n = await committed(admin, group, topics.events)
                now = time.perf_counter()
                if n > 0 and first is None:
                    first = (now, n)
                if n >= total:
                    break
                if now - t_start > 600:
                    raise SystemExit(f"aggregator did not finish in 600s ({n}/{total}); log: {log}")
                await asyncio.sleep(0.05)
            assert first is not None
            span = now - first[0]
            rate = (total - first[1]) / span if span > 0 else float("inf")
            print(
                f"aggregator (faust, {settings.kafka.partitions} partitions, real broker): {total} events "
                f"({runs} runs) committed {now - t_start:.1f}s after start; "
                f"{total - first[1]} events in {span:.2f}s after its first commit = {rate:,.0f} events/s"
            )
            reference = fold_locally(await read_events(settings))
            await wait_totals(settings, reference, wait_s=120)
            print("totals match the reference fold")
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    if args.bootstrap:
        asyncio.run(measure(args.bootstrap, args.runs))
        return
    from calmrun.devkafka import DevKafka
    from calmrun.localproc import free_port

    kafka = DevKafka(data_dir=Path(tempfile.mkdtemp(prefix="calmrun-costs-kafka-")), port=free_port())
    kafka.start()
    try:
        asyncio.run(measure(kafka.bootstrap, args.runs))
    finally:
        kafka.stop()


if __name__ == "__main__":
    main()

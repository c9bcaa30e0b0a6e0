"""The road not taken: the cost fold as a faust app batching with ``stream.take_events``, for its throughput.

``python -m bench.faust_take --runs N``: the same synthetic events as ``python -m bench.aggregator --runs N``,
then a faust worker (a subprocess) whose agent takes up to 5,000 events (or 0.2 s) at a time, folds them with
``calmrun.costs.fold.PartitionFold`` and writes each touched key once per batch to a faust table (one
changelog record per key per batch). Timed from its first committed offset to the end of the topic, with the
worker's CPU seconds. A throughput experiment only: it does not restore its folds after a restart, so it is
not exact, and it is not shipped (the aggregator runs on aiokafka; docs/cost.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from bench.aggregator import _covered, encode, produce, settings_for, workload
from bench.common import ROOT, cpu_s
from calmrun.costs.costtopics import CostTopics, ensure_cost_topics


def worker(bootstrap: str, pfx: str, data_dir: Path) -> None:
    import faust

    from calmrun.costs.fold import PartitionFold
    from calmrun.wire.codec import RecordCodec, wire_models

    topics = CostTopics(pfx)
    app = faust.App(
        f"{pfx}-faust-take",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=4,
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_linger=0.005,
        stream_buffer_maxsize=16384,
    )
    source = app.topic(topics.events, key_serializer="raw", value_serializer="raw")
    table = app.Table("totals", partitions=4, key_type=str)  # values: the JSON text of each total
    avro = RecordCodec(wire_models()).avro
    folds: dict[int, PartitionFold] = {}

    async def fold_events(stream: Any) -> None:
        async for events in stream.take_events(5000, within=0.2):
            for event in events:
                msg = event.message
                fold = folds.setdefault(msg.partition, PartitionFold(msg.partition, {}))
                fold.apply(avro.decode(msg.value)[1], msg.offset)
            for fold in folds.values():
                totals, _ = fold.drain()
                for key, value in totals:
                    table[key.decode()] = value.decode() if value is not None else None

    app.agent(source, name="fold")(fold_events)

    async def on_started() -> None:
        app.producer.buffer.max_messages = 100_000

    app.task(on_started)
    faust.Worker(app, loglevel="warning", redirect_stdouts=False).execute_from_commandline()


async def measure(bootstrap: str, runs: int) -> None:
    pfx = f"bft{uuid.uuid4().hex[:8]}"
    await ensure_cost_topics(settings_for(bootstrap, pfx))
    raw = encode(workload(runs, 1_750_000_000_000))
    await produce(bootstrap, pfx, raw)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    data = Path(tempfile.mkdtemp(prefix="calmrun-faust-take-"))
    import subprocess

    args = [sys.executable, "-m", "bench.faust_take", "--worker", "--bootstrap", bootstrap, "--prefix", pfx]
    log = open(data / "worker.log", "wb")  # noqa: SIM115, ASYNC230 - a bench driver, before timing
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
        [*args, "--data-dir", str(data)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        t0, first, cpu0 = time.perf_counter(), None, 0.0
        while True:
            n = await _covered(admin, f"{pfx}-faust-take", CostTopics(pfx).events)
            now = time.perf_counter()
            if n > 0 and first is None:
                first, cpu0 = (now, n), cpu_s(proc.pid)
            if n >= len(raw):
                break
            if now - t0 > 900 or proc.poll() is not None:
                raise SystemExit(f"faust worker did not finish ({n}/{len(raw)}); log {data / 'worker.log'}")
            await asyncio.sleep(0.05)
        assert first is not None
        span, cpu = now - first[0], cpu_s(proc.pid) - cpu0
        print(
            f"faust + stream.take_events(5000, within=0.2): {len(raw)} events ({runs} runs, synthetic mix); "
            f"{(len(raw) - first[1]) / span:,.0f} events/s from its first commit to the end "
            f"({(len(raw) - first[1]) / cpu:,.0f} per CPU second of the worker; load average "
            f"{os.getloadavg()[0]:.1f})"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--bootstrap")
    parser.add_argument("--prefix")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.argv = [sys.argv[0], "worker"]  # faust parses the command line itself
        worker(args.bootstrap, args.prefix, args.data_dir)
        return
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

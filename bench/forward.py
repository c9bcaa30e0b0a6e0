"""The floor: a raw consume -> produce forwarder as its own process, on aiokafka or confluent-kafka.

    python -m bench.forward --client aiokafka|confluent --bootstrap B --src S --dst D --status-file F
        (--count N | --latency)

``--count N``: forward the first N records of ``src`` (all partitions, from the beginning) to ``dst``, same
key and partition, and report the time from the first record consumed to the last produce acknowledged.
``--latency``: forward until SIGTERM and report, per record, the time from its upstream send (nanoseconds
in the ``t`` header) to its consumption here: one hop. Producers use calmrun's worker settings (acks=all,
idempotence, linger 5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from bench.common import PARTITIONS, pct, write_status


def _hop_ns(headers: Any) -> int | None:
    for k, v in headers or ():
        if k == "t":
            return time.time_ns() - int(v)
    return None


def _report(path: Path, elapsed: float, count: int, hops: list[int], state: str, cpu: float) -> None:
    ms = [h / 1e6 for h in hops]
    write_status(
        path,
        {
            "state": state,
            "cpu_us_per_record": cpu / count * 1e6 if count else 0.0,
            "count": count,
            "elapsed_s": elapsed,
            "rate": count / elapsed if elapsed else 0.0,
            "hops": len(ms),
            "p50_ms": pct(ms, 50),
            "p99_ms": pct(ms, 99),
        },
    )


async def aiokafka_forward(args: argparse.Namespace, path: Path) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tps = [TopicPartition(args.src, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    write_status(path, {"state": "ready"})
    futures: list[asyncio.Future[Any]] = []
    hops: list[int] = []
    n, t0, cpu0 = 0, 0.0, 0.0
    try:
        while not stop.is_set() and (args.latency or n < args.count):
            batch = await consumer.getmany(timeout_ms=100, max_records=1000)
            for records in batch.values():
                for rec in records:
                    if n == 0:
                        t0, cpu0 = time.perf_counter(), time.process_time()
                    if args.latency:
                        hop = _hop_ns(rec.headers)
                        if hop is not None:
                            hops.append(hop)
                    futures.append(
                        await producer.send(
                            args.dst,
                            rec.value,
                            key=rec.key,
                            partition=rec.partition,
                            headers=list(rec.headers),
                        )
                    )
                    n += 1
            if args.latency and batch:
                write_status(path, {"state": "running", "hops": len(hops)})
            if len(futures) > 20_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - t0 if n else 0.0
        _report(path, elapsed, n, hops, "done", time.process_time() - cpu0 if n else 0.0)
    finally:
        await consumer.stop()
        await producer.stop()


def confluent_forward(args: argparse.Namespace, path: Path) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"fwd-{args.src}",
            "enable.auto.commit": False,
            # the default (1000 ms) stalls the prefetch queue: about 130,000 records/s here
            "fetch.queue.backoff.ms": 1,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "batch.size": 256 * 1024,
        }
    )
    consumer.assign([TopicPartition(args.src, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    write_status(path, {"state": "ready"})
    acked = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            raise RuntimeError(str(err))
        acked[0] += 1

    hops: list[int] = []
    n, t0, cpu0 = 0, 0.0, 0.0
    try:
        while not stop and (args.latency or n < args.count):
            if args.latency:  # consume() waits for num_messages or the timeout: one at a time here
                one = consumer.poll(0.1)
                msgs = [one] if one is not None else []
            else:
                msgs = consumer.consume(num_messages=1000, timeout=0.1)
            for m in msgs:
                if m.error():
                    raise RuntimeError(str(m.error()))
                if n == 0:
                    t0, cpu0 = time.perf_counter(), time.process_time()
                if args.latency:
                    hop = _hop_ns(m.headers())
                    if hop is not None:
                        hops.append(hop)
                while True:
                    try:
                        producer.produce(
                            args.dst,
                            m.value(),
                            m.key(),
                            partition=m.partition() or 0,
                            headers=m.headers(),
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:
                        producer.poll(0.005)
                n += 1
            producer.poll(0)
            if args.latency and msgs:
                write_status(path, {"state": "running", "hops": len(hops)})
        producer.flush(60)
        elapsed = time.perf_counter() - t0 if n else 0.0
        _report(path, elapsed, acked[0], hops, "done", time.process_time() - cpu0 if n else 0.0)
    finally:
        consumer.close()


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=["aiokafka", "confluent"], required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--status-file", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    path = Path(args.status_file)
    if args.client == "aiokafka":
        asyncio.run(aiokafka_forward(args, path))
    else:
        confluent_forward(args, path)


if __name__ == "__main__":
    cli()

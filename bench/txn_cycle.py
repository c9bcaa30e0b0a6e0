"""How long one transaction cycle takes, by client and by how soon aiokafka retries the transaction's first
request: ``python -m bench.txn_cycle --bootstrap B [--busy-retry-ms 20 5 1] [--confluent] [--rounds 3]``.

A cycle is the worker's: begin, three 200-byte records on three partitions, the input offsets, commit. The
worker begins a partition's next transaction as soon as the last one committed; the broker is then often
still writing that one's markers and answers the AddPartitionsToTxn that opens the next one with
CONCURRENT_TRANSACTIONS. aiokafka retries it after a fixed 20 ms (its ``BACKOFF_OVERRIDE``), whatever the
producer's ``retry_backoff_ms``; calmrun sets ``calmrun.kafka.connect.TXN_BUSY_RETRY_MS`` instead.
``--confluent`` adds confluent-kafka (librdkafka, the bench extra) with KIP-447 group metadata from a
consumer joined with ``group.protocol=consumer``, as ``../shared/probes/txn_cycle_clients.py`` does. The
variants are measured alternately, ``--rounds`` times, so a busy machine weighs on each alike.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.producer import sender
from aiokafka.structs import TopicPartition

from bench.common import pct
from calmrun.kafka.connect import TXN_BUSY_RETRY_MS, TXN_RETRY_BACKOFF_MS

WARMUP = 10  # the first cycles find the coordinators


async def aiokafka_cycles(bootstrap: str, busy_retry_ms: float, cycles: int) -> tuple[list[float], float]:
    """Each cycle's milliseconds, and the client's CPU milliseconds per cycle."""
    sender.BACKOFF_OVERRIDE = busy_retry_ms / 1000
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    topic = f"btxn{uuid.uuid4().hex[:8]}"
    try:
        await admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"{topic}.tx",
        enable_idempotence=True,
        linger_ms=0,
        retry_backoff_ms=TXN_RETRY_BACKOFF_MS,
    )
    await producer.start()
    times = []
    try:
        for i in range(cycles):
            if i == WARMUP:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            await producer.begin_transaction()
            sent = [await producer.send(topic, b"x" * 200, partition=k) for k in range(3)]
            await producer.send_offsets_to_transaction({TopicPartition(topic, 3): i}, f"{topic}.group")
            await producer.commit_transaction()
            for f in sent:
                await f
            times.append((time.perf_counter() - t0) * 1000)
        cpu_ms = (time.process_time() - cpu0) * 1000 / (cycles - WARMUP)
    finally:
        await producer.stop()
    return times[WARMUP:], cpu_ms


def confluent_cycles(bootstrap: str, cycles: int) -> tuple[list[float], float]:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka import TopicPartition as CTopicPartition
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin import NewTopic as CNewTopic

    topic = f"bck{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([CNewTopic(topic, 4, 1), CNewTopic(topic + "in", 4, 1)]).values():
        f.result()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.group",
            "enable.auto.commit": False,
            "group.protocol": "consumer",
        }
    )
    consumer.subscribe([topic + "in"])
    end = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < end:
        consumer.poll(0.1)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{topic}.tx",
            "linger.ms": 0,
            "retry.backoff.ms": TXN_RETRY_BACKOFF_MS,
        }
    )
    producer.init_transactions()
    times = []
    try:
        for i in range(cycles):
            if i == WARMUP:
                cpu0 = time.process_time()  # every thread of the process: librdkafka's too
            t0 = time.perf_counter()
            producer.begin_transaction()
            for k in range(3):
                producer.produce(topic, key=b"k", value=b"x" * 200, partition=k)
            offsets = [CTopicPartition(topic + "in", 0, i)]
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata())
            producer.commit_transaction()
            times.append((time.perf_counter() - t0) * 1000)
        cpu_ms = (time.process_time() - cpu0) * 1000 / (cycles - WARMUP)
    finally:
        consumer.close()
    return times[WARMUP:], cpu_ms


def show(times: list[float], cpu_ms: float) -> str:
    return f"p50 {pct(times, 50):.1f} p90 {pct(times, 90):.1f} cpu {cpu_ms:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.txn_cycle")
    p.add_argument("--bootstrap", required=True)
    busy = [20, TXN_RETRY_BACKOFF_MS, TXN_BUSY_RETRY_MS]
    p.add_argument("--busy-retry-ms", type=float, nargs="+", default=busy)
    p.add_argument("--confluent", action="store_true", help="confluent-kafka too (the bench extra)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycles", type=int, default=150)
    args = p.parse_args()
    cycles = args.cycles + WARMUP
    for r in range(1, args.rounds + 1):
        line = []
        if args.confluent:
            times, cpu = confluent_cycles(args.bootstrap, cycles)
            line.append(f"confluent-kafka {show(times, cpu)}")
        for busy in args.busy_retry_ms:
            times, cpu = asyncio.run(aiokafka_cycles(args.bootstrap, busy, cycles))
            line.append(f"aiokafka, busy retry {busy:g} ms: {show(times, cpu)}")
        print(f"round {r} (ms per cycle; cpu: the client's): " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()

"""How long one transaction cycle takes (begin, one record, the offsets, commit), by the producer's retry
backoff: ``python -m bench.txn_cycle --bootstrap B [--backoff-ms 100 10 5]``.

The worker begins a partition's next transaction as soon as the last one committed; the broker is then
often still writing that one's markers and answers CONCURRENT_TRANSACTIONS (NOT_ENOUGH_REPLICAS to a client
of aiokafka's protocol version), and aiokafka retries after ``retry_backoff_ms``. This measures what that
backoff costs per cycle; ``calmrun.kafka.connect.TXN_RETRY_BACKOFF_MS`` was chosen from it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from bench.common import pct


async def cycle_ms(bootstrap: str, backoff_ms: int, cycles: int = 60) -> list[float]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    topic = f"btxn{time.time_ns() % 10**9}"
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"{topic}.tx",
        enable_idempotence=True,
        linger_ms=1,
        retry_backoff_ms=backoff_ms,
    )
    await producer.start()
    times = []
    try:
        for i in range(cycles):
            t0 = time.perf_counter()
            await producer.begin_transaction()
            sent = await producer.send(topic, b"x", partition=0)
            await producer.send_offsets_to_transaction({TopicPartition(topic, 0): i}, f"{topic}.group")
            await producer.commit_transaction()
            await sent
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await producer.stop()
    return times[10:]  # the first cycles find the coordinator


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.txn_cycle")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--backoff-ms", type=int, nargs="+", default=[100, 10, 5])
    args = p.parse_args()
    for backoff in args.backoff_ms:
        times = asyncio.run(cycle_ms(args.bootstrap, backoff))
        p50, p90 = pct(times, 50), pct(times, 90)
        print(f"retry_backoff_ms={backoff}: commit cycle p50 {p50:.1f} ms, p90 {p90:.1f} ms")


if __name__ == "__main__":
    main()

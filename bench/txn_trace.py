"""The requests of a few transaction cycles, timed, with their error codes:
``python -m bench.txn_trace --bootstrap B [--busy-retry-ms 20] [--cycles 4]``.

Each line: start -> end (ms from the cycle's begin), the request, and the per-partition or request error
codes of its answer (51: CONCURRENT_TRANSACTIONS, 19: NOT_ENOUGH_REPLICAS). It shows where aiokafka's cycle
waits: an AddPartitionsToTxn refused while the broker writes the last transaction's markers, sent again
``--busy-retry-ms`` later (aiokafka's ``BACKOFF_OVERRIDE``; ``bench.txn_cycle`` measures what it costs).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import aiokafka.client
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.producer import sender
from aiokafka.structs import TopicPartition

from calmrun.kafka.connect import TXN_RETRY_BACKOFF_MS

WARMUP = 10


async def trace(bootstrap: str, busy_retry_ms: float, cycles: int) -> None:
    sender.BACKOFF_OVERRIDE = busy_retry_ms / 1000
    lines: list[str] = []
    t0 = [0.0]
    send = aiokafka.client.AIOKafkaClient.send

    async def timed(self: Any, node_id: Any, request: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        resp = await send(self, node_id, request, *a, **k)
        end = time.perf_counter()
        answer = next(
            (str(getattr(resp, f))[:90] for f in ("error_code", "errors", "topics") if hasattr(resp, f)), ""
        )
        lines.append(
            f"  {1000 * (start - t0[0]):7.1f} -> {1000 * (end - t0[0]):7.1f}  {type(request).__name__}"
            f" {answer}"
        )
        return resp

    aiokafka.client.AIOKafkaClient.send = timed  # type: ignore[method-assign]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    topic = f"btrace{uuid.uuid4().hex[:8]}"
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
    try:
        for i in range(WARMUP + cycles):
            lines.clear()
            t0[0] = time.perf_counter()
            await producer.begin_transaction()
            sent = [await producer.send(topic, b"x" * 200, partition=k) for k in range(3)]
            await producer.send_offsets_to_transaction({TopicPartition(topic, 3): i}, f"{topic}.group")
            await producer.commit_transaction()
            for f in sent:
                await f
            if i >= WARMUP:
                print(f"cycle {i - WARMUP + 1}: {1000 * (time.perf_counter() - t0[0]):.1f} ms")
                print("\n".join(lines), flush=True)
    finally:
        await producer.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.txn_trace")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--busy-retry-ms", type=float, default=20)
    p.add_argument("--cycles", type=int, default=4)
    args = p.parse_args()
    asyncio.run(trace(args.bootstrap, args.busy_retry_ms, args.cycles))


if __name__ == "__main__":
    main()

"""A writer's CPU per record, its records sent one ``send`` each against one aiokafka batch per topic
partition (``calmrun.streams.txn``): ``python -m bench.txn_send [--bootstrap B] [--rounds 3] [--txns 300]
[--decisions 5]``.

One ``TxnWriter`` over one transactional producer commits ``--txns`` transactions, one at a time,
each of ``--decisions`` decisions of three records of 300 bytes (two headers each) on three partitions.
Two figures per path, in µs of this process's CPU (``time.process_time``, not the wall clock) per record:
the process's over the transactions (commits and the sender's work included: on a busy machine the
commit cycle's retries make it vary more than the paths differ), and the records' own, from a
transaction's first record until its last batch is handed over (the event loop never yields in it). The two
paths alternate, ``--rounds`` times, on the same writer's code, the send path put in place of ``Batches``
for its rounds. Without ``--bootstrap`` a broker is started for the run (``calmrun.devkafka``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import on_a_broker
from calmrun.kafka.connect import TXN_RETRY_BACKOFF_MS
from calmrun.streams import txn
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.gate import Gate
from calmrun.streams.records import Out
from calmrun.streams.txn import TxnWriter

RECORDS, PARTITIONS, SIZE = 3, 3, 300  # a decision's records, on three partitions
WARMUP = 20  # transactions before the clock starts: coordinators found, partitions known


class _Sends:
    """The path before the batches: one ``send`` (a coroutine and a future) per record."""

    def __init__(self, producer: AIOKafkaProducer, max_request_size: int) -> None:
        self._producer = producer
        self._futures: list[asyncio.Future[Any]] = []

    async def add(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: Iterable[Any]
    ) -> None:
        fut = await self._producer.send(topic, value, key=key, partition=partition, headers=list(headers))
        fut.add_done_callback(txn.retrieved)
        self._futures.append(fut)

    async def close(self) -> list[asyncio.Future[Any]]:
        return self._futures


class _Timed:
    """A record path whose CPU, from a transaction's first record to its batches sent, is summed in
    ``cpu``: the records' own cost, measured without the commit's (the event loop never yields in it)."""

    cpu = 0.0

    def __init__(self, path: type, producer: AIOKafkaProducer, max_request_size: int) -> None:
        self._inner, self._t0 = path(producer, max_request_size), 0.0

    async def add(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: Iterable[Any]
    ) -> None:
        if not self._t0:
            self._t0 = time.process_time()
        await self._inner.add(topic, partition, key, value, headers)

    async def close(self) -> list[asyncio.Future[Any]]:
        futures: list[asyncio.Future[Any]] = await self._inner.close()
        _Timed.cpu += time.process_time() - self._t0
        return futures


class _Lost:
    def lost(self, parts: set[int], exc: BaseException) -> None:
        raise SystemExit(f"the writer failed: {exc!r}")


async def cpu_per_record(bootstrap: str, topic: str, txns: int, decisions: int) -> tuple[float, float]:
    """Microseconds of this process's CPU per record over ``txns`` transactions (after the warm-up): all
    of it, and the records' own (``_Timed``)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"{topic}.tx.{uuid.uuid4().hex[:6]}",
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        max_batch_size=256 * 1024,
        retry_backoff_ms=TXN_RETRY_BACKOFF_MS,
    )
    writer = TxnWriter("0", producer, f"{topic}.group", Checkpoint(), Gate(1000), _Lost(), {0})
    await writer.start()
    value = b"v" * SIZE
    try:
        for i in range(WARMUP + txns):
            if i == WARMUP:
                cpu0, _Timed.cpu = time.process_time(), 0.0
            for d in range(decisions):
                key = f"run-{i}-{d}".encode()
                headers = (("calmrun.type", b"step_completed"), ("calmrun.run", key))
                outs = [Out(topic, (d + r) % PARTITIONS, key, value, headers) for r in range(RECORDS)]
                writer.add(0, outs, None, None, inputs=())
            await writer.flush()
        cpu = time.process_time() - cpu0
        if writer.commits != WARMUP + txns:
            raise SystemExit(f"{writer.commits} commits for {WARMUP + txns} transactions")
    finally:
        await writer.close()
    n = txns * decisions * RECORDS
    return cpu * 1e6 / n, _Timed.cpu * 1e6 / n


async def run(bootstrap: str, rounds: int, txns: int, decisions: int) -> None:
    topic = f"btxs{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    batches = txn.Batches
    records = txns * decisions * RECORDS
    print(f"{txns} transactions of {decisions * RECORDS} records of {SIZE} bytes on {PARTITIONS} partitions")
    print(f"us of CPU per record, {records} records a round: the process's | the records' own")
    for r in range(1, rounds + 1):
        line, us = [], {}
        for name, path in (("send", _Sends), ("batch", batches)):
            txn.Batches = functools.partial(_Timed, path)  # type: ignore[misc, assignment]
            try:
                us[name] = await cpu_per_record(bootstrap, topic, txns, decisions)
            finally:
                txn.Batches = batches  # type: ignore[misc]
            line.append(f"{name} {us[name][0]:.1f} | {us[name][1]:.1f}")
        saved = [s - b for s, b in zip(us["send"], us["batch"], strict=True)]
        line.append(f"send - batch {saved[0]:.1f} | {saved[1]:.1f}")
        print(f"round {r}: " + "; ".join(line), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.txn_send")
    p.add_argument("--bootstrap", help="a running broker (default: one started for the run)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--txns", type=int, default=300)
    p.add_argument("--decisions", type=int, default=5, help="per transaction, three records each")
    args = p.parse_args()
    on_a_broker(args.bootstrap, lambda b: run(b, args.rounds, args.txns, args.decisions), "bench")


if __name__ == "__main__":
    main()

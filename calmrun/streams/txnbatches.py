"""One transaction's records as aiokafka batches: what a writer sends between ``begin_transaction`` and its
commit (``streams.txn``), without a coroutine or a future per record."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aiokafka
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import TopicPartition


class Batches:
    """One transaction's records, one aiokafka batch per topic partition (``create_batch``, ``send_batch``).

    The records, their order in each partition and their timestamps (taken as each is added) are what
    ``send`` would write, but with one future per batch instead of one per record, and no coroutine per
    record (figures in docs/performance.md, ``python -m bench.txn_send``). aiokafka's ``send_batch`` takes
    the same transactional path as ``send``: it refuses outside a transaction, adds the partition to the
    transaction before the batch can be drained, and fails as ``send`` does once the producer failed. A
    batch that is full goes out and another starts, as the producer's own accumulator does; a record over
    ``max_request_size`` is refused before the commit, as ``send`` refuses it.
    """

    def __init__(self, producer: AIOKafkaProducer, max_request_size: int) -> None:
        self._producer = producer
        self._max_request_size = max_request_size
        self._open: dict[tuple[str, int], Any] = {}  # aiokafka's BatchBuilder, per topic and partition
        self._futures: list[asyncio.Future[Any]] = []
        self.partitions: list[TopicPartition] = []  # every partition a batch went to

    async def add(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: Iterable[Any]
    ) -> None:
        hdrs = list(headers)
        tp = (topic, partition)
        builder = self._open.get(tp)
        if builder is None:
            builder = self._open[tp] = self._producer.create_batch()
        added = builder.append(key=key, value=value, timestamp=None, headers=hdrs)
        if added is None:  # full
            await self._send(tp, builder)
            builder = self._open[tp] = self._producer.create_batch()
            added = builder.append(key=key, value=value, timestamp=None, headers=hdrs)  # a first one fits
        if added.size + _BATCH_HEADER > self._max_request_size:  # the batch is never sent: no commit follows
            raise MessageSizeTooLargeError(
                f"a record of {added.size} bytes to {topic}[{partition}] is larger than max_request_size "
                f"({self._max_request_size})"
            )

    async def close(self) -> list[asyncio.Future[Any]]:
        """Send the batches still open; every batch's future (resolved once the broker wrote the batch)."""
        for tp, builder in self._open.items():
            await self._send(tp, builder)
        self._open.clear()
        return self._futures

    async def _send(self, tp: tuple[str, int], builder: Any) -> None:
        builder.close()  # closed to further records: nothing but this transaction's order goes in it
        fut = await self._producer.send_batch(builder, tp[0], partition=tp[1])
        self.partitions.append(TopicPartition(*tp))
        fut.add_done_callback(retrieved)  # a transaction cut short by fencing leaves its futures unawaited
        self._futures.append(fut)


_BATCH_HEADER = 61  # bytes of a record batch's header (v2) around its records


def require_batch_sends() -> None:
    """Fail at once if the installed aiokafka lacks the batch calls a writer makes (``Batches``).

    ``create_batch``, ``send_batch`` and ``BatchBuilder.append`` (returning the record's size) are aiokafka's
    public batch interface ("Direct batch control" in its producer guide); this says plainly, when a writer
    is made, that an aiokafka without them cannot carry the worker's transactions, instead of failing in
    the first one.

    Raises:
        RuntimeError: one of them is missing.
    """
    from aiokafka.producer.message_accumulator import BatchBuilder

    missing = [n for n in ("create_batch", "send_batch") if not callable(getattr(AIOKafkaProducer, n, None))]
    if not callable(getattr(BatchBuilder, "append", None)):
        missing.append("BatchBuilder.append")
    if missing:
        names = ", ".join(missing)
        raise RuntimeError(f"aiokafka {aiokafka.__version__} lacks {names}: see calmrun.streams.txn")


def retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a send's outcome seen (it is raised by the gather after the commit, when there is one)."""
    if not fut.cancelled():
        fut.exception()

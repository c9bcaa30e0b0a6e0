"""Reading a topic: to its end offsets (``read_to_end``) or on as records come (``follow``, ``Tail``).

The one reader of calmrun's topics for the restore of run state, the CLI, replay, the checker and the
cost readers. Consumers read ``read_committed`` (the worker and the aggregator write in transactions), and
positions are numeric seeks: a reset to the beginning races with the consumer's own reset policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import TopicPartition

from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import start_client
from calmrun.settings import Settings


async def read_to_end(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int | None = None
) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
    """Yield the records of ``tps`` from the start (or the offsets of ``since_ms``) to their end offsets."""
    consumer.assign(tps)
    end = await consumer.end_offsets(tps)
    start = await consumer.beginning_offsets(tps)
    if since_ms is not None:
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            start[tp] = at.offset if at is not None else end[tp]
    for tp in tps:  # numeric seeks: a reset to the beginning races with the consumer's own reset policy
        consumer.seek(tp, start[tp])
    remaining = {tp for tp in tps if end[tp] > 0}
    while remaining:
        for tp in list(remaining):
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
        if not remaining:
            break
        batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=5000)
        for tp, records in batch.items():
            for rec in records:
                if rec.offset < end[tp]:
                    yield rec


async def follow(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    start: dict[TopicPartition, int],
    *,
    until: float | None = None,
    on_caught_up: Callable[[], None] | None = None,
) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
    """Yield the records of ``tps`` from ``start`` on, as they come, until ``until`` (monotonic) passes.

    ``on_caught_up`` is called once the end offsets seen at the start are reached.
    """
    consumer.assign(tps)
    end = await consumer.end_offsets(tps)
    for tp in tps:
        consumer.seek(tp, start[tp])
    pending = {tp for tp in tps if end[tp] > start[tp]}
    if not pending and on_caught_up is not None:
        on_caught_up()
    while until is None or time.monotonic() <= until:
        batch = await consumer.getmany(*tps, timeout_ms=200, max_records=5000)
        for records in batch.values():
            for rec in records:
                yield rec
        if pending:
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if not pending and on_caught_up is not None:
                on_caught_up()


class Tail:
    """Reads every partition of a topic from the beginning and keeps following it, applying each record.

    Args:
        settings: where the broker is and how many partitions calmrun topics have.
        topic: the topic to read.
        apply: called with (key, value) for every record in offset order per partition (value None: deleted).
    """

    def __init__(self, settings: Settings, topic: str, apply: Callable[[bytes, bytes | None], None]) -> None:
        self.settings, self.topic, self.apply = settings, topic, apply
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self.records = 0

    async def start(self) -> None:
        """Start following; ``caught_up()`` tells when the end seen at start was reached.

        Raises:
            BrokerUnavailableError: no broker answers.
        """
        k = self.settings.kafka
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"{k.client_id}-tail",
            **client_kwargs(k),
        )
        await start_client(self._consumer, k)
        tps = [TopicPartition(self.topic, p) for p in range(k.partitions)]
        self._consumer.assign(tps)
        start = await self._consumer.beginning_offsets(tps)
        self._task = asyncio.create_task(self._run(tps, start))

    async def _run(self, tps: list[TopicPartition], start: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        async for rec in follow(self._consumer, tps, start, on_caught_up=self._caught_up.set):
            self.records += 1
            self.apply(rec.key or b"", rec.value)

    async def caught_up(self, wait_s: float = 30.0) -> None:
        """Wait until everything present at ``start()`` has been applied."""
        await asyncio.wait_for(self._caught_up.wait(), wait_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def __aenter__(self) -> Tail:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

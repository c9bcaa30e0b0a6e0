"""Reading the aggregator's output: ``<prefix>.costs.totals`` into a ``CostTable``, with how current it is.

The topic is compacted and keyed per source partition (each partition of the events topic has its own
partial sums and one coverage record, ``_source``, saying up to which offset it is folded); readers add the
partitions up. The aggregator writes a partition's totals and coverage in one Kafka transaction per batch,
so a reader (``read_committed``) sees totals that are exactly the fold of the events below the coverage.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.costs.costtopics import CostTopics, ensure_cost_topics
from calmrun.costs.table import CostTable, Coverage
from calmrun.errors import CostsNotCurrentError
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.reader import Tail
from calmrun.kafka.topics import start_client
from calmrun.settings import Settings

CompactedTail = Tail
"""The cost readers follow the compacted totals and tenants topics with the one tail of ``kafka.reader``."""


async def events_end(settings: Settings) -> dict[int, int]:
    """The events topic's end per partition now: one past its last committed record.

    Not the end offset itself: a transactional writer (the worker) leaves a commit marker after its last
    records, which occupies an offset but is no event, so a table that covers every event would never
    seem to cover that offset.
    """
    k = settings.kafka
    consumer = AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        client_id=f"{k.client_id}-costs-ends",
        **client_kwargs(k),
    )
    await start_client(consumer, k)
    try:
        topic = CostTopics(k.prefix).events
        tps = [TopicPartition(topic, p) for p in range(k.partitions)]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        out = {tp.partition: off for tp, off in ends.items()}
        for tp in tps:
            if ends[tp] > begins[tp]:
                out[tp.partition] = await _after_last_record(consumer, tp, begins[tp], ends[tp])
        return out
    finally:
        await consumer.stop()


async def _after_last_record(consumer: AIOKafkaConsumer, tp: TopicPartition, begin: int, end: int) -> int:
    """One past the last committed record before ``end`` (looking back at most 64 offsets: markers of a
    few transactions; past that, ``end`` itself, which only over-states the lag)."""
    consumer.assign([tp])
    consumer.seek(tp, max(begin, end - _TAIL))
    last = None
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=500)
        for rec in batch.get(tp, []):
            if rec.offset < end:
                last = int(rec.offset)
        if not batch and await consumer.position(tp) < end:
            break  # nothing more will come (a fetch returned no progress): keep what was seen
    if last is not None:
        return last + 1
    return end if end - begin > _TAIL else begin


_TAIL = 64


async def read_totals(settings: Settings, wait_s: float = 30.0) -> CostTable:
    """``<prefix>.costs.totals`` as it is now (read to its end offsets)."""
    table = CostTable()
    await ensure_cost_topics(settings)
    async with CompactedTail(settings, CostTopics(settings.kafka.prefix).totals, table.apply) as tail:
        await tail.caught_up(wait_s)
    return table


async def read_current(
    settings: Settings, *, wait: bool = False, wait_s: float = 120.0
) -> tuple[CostTable, Coverage]:
    """The totals and their coverage; with ``wait``, once they cover the events topic's end as of this call.

    Raises:
        CostsNotCurrentError: ``wait`` and the totals did not cover that end within ``wait_s`` (is an
            aggregator running?).
    """
    if not wait:
        table = await read_totals(settings)
        return table, _coverage(table, await events_end(settings))
    end = await events_end(settings)
    table = CostTable()
    await ensure_cost_topics(settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    async with CompactedTail(settings, CostTopics(settings.kafka.prefix).totals, table.apply) as tail:
        await tail.caught_up(wait_s)
        while not Coverage(table.covered, end).covers(end):
            if loop.time() > deadline:
                raise CostsNotCurrentError(
                    prefix=settings.kafka.prefix, lag=Coverage(table.covered, end).lag, wait_s=wait_s
                )
            await asyncio.sleep(0.1)
    return table, _coverage(table, end)


def _coverage(table: CostTable, end: dict[int, int]) -> Coverage:
    return Coverage({p: table.covered.get(p, 0) for p in end}, end)

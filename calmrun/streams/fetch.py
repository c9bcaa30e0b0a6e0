"""Fetching past records the Kafka client itself cannot parse (a header name that is not UTF-8).

aiokafka decodes header names as UTF-8 while it unpacks a fetched batch; a record from another client with
any other bytes there makes ``getmany`` raise ``UnicodeDecodeError``, for every call, at the same offset:
a worker that let it escape would crash, restart and crash again on that record. Worse, the records of
the same fetch before it are dropped, and the next call would skip past them. ``Fetcher.getmany`` keeps
both from happening: on such an error it rewinds every partition to where the call began, reads each one
alone, and finds the offending offset by reading that partition one record at a time; the caller parks
that offset and goes on after it. The normal path costs nothing: only a failed call does this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import TopicPartition

log = logging.getLogger("calmrun.fetch")

UNPARSABLE = (UnicodeDecodeError,)
"""What aiokafka raises from ``getmany`` for one record it cannot parse (header names are decoded)."""


@dataclass
class Fetched:
    """One fetch: records by partition, and the offsets that could not be parsed (with the error)."""

    records: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = field(default_factory=dict)
    unreadable: list[tuple[TopicPartition, int, Exception]] = field(default_factory=list)


async def getmany(
    consumer: AIOKafkaConsumer,
    *,
    timeout_ms: int,
    max_records: int,
    consumed_to: Callable[[TopicPartition], int | None],
) -> Fetched:
    """``consumer.getmany`` that steps past a record the client cannot parse instead of raising.

    A partition holding such a record returns the records before it; the record's offset is reported in
    ``unreadable`` and the partition's position is moved past it (``seek``), so the caller must park it.

    Args:
        consumed_to: the offset after the last record the caller was given from a partition, or None if
            none since it was assigned (then the partition started at its committed offset, or at its
            beginning: calmrun consumers reset to ``earliest``).

    Raises:
        Whatever ``getmany`` raises for another reason (a broker error, the consumer stopped).
    """
    try:
        return Fetched(await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
    except UNPARSABLE as exc:
        log.warning("a fetched record cannot be parsed (%r): reading each partition alone", exc)
    out = Fetched()
    before: dict[TopicPartition, int] = {}
    for tp in sorted(consumer.assignment()):
        pos = consumed_to(tp)
        if pos is None:
            pos = await consumer.committed(tp)
        if pos is None:
            pos = (await consumer.beginning_offsets([tp]))[tp]
        before[tp] = pos
        consumer.seek(tp, pos)  # the failed call's records were dropped: read them again
    for tp, pos in before.items():
        try:
            out.records.update(await _alone(consumer, tp, timeout_ms, max_records))
        except UNPARSABLE:
            consumer.seek(tp, pos)
            await _step(consumer, tp, max_records, timeout_ms, out)
    return out


async def _alone(
    consumer: AIOKafkaConsumer, tp: TopicPartition, timeout_ms: int, max_records: int
) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    for _ in range(2):  # the first call may only drain what the failed call left behind
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await consumer.getmany(
            tp, timeout_ms=timeout_ms, max_records=max_records
        )
        if batch:
            return batch
    return {}


async def _step(
    consumer: AIOKafkaConsumer, tp: TopicPartition, limit: int, timeout_ms: int, out: Fetched
) -> None:
    """Read ``tp`` one record at a time up to its unparsable record; report it and seek past it."""
    got: list[ConsumerRecord[bytes, bytes]] = []
    for _ in range(limit):
        pos = await consumer.position(tp)
        try:
            batch = await _alone(consumer, tp, timeout_ms, 1)
        except UNPARSABLE as exc:
            out.unreadable.append((tp, pos, exc))
            consumer.seek(tp, pos + 1)
            break
        if not batch:
            break
        got.extend(batch.get(tp, []))
    if got:
        out.records[tp] = got

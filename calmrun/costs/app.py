"""The cost aggregator: ``<prefix>.runs.events`` folded into the compacted ``<prefix>.costs.totals``.

It runs on aiokafka, the runtime's own Kafka shell (docs/cost.md says why not faust). Per source partition it
owns, in one consumer group (``costs.app_id``, default ``<prefix>-costs``; more aggregators share the
partitions):

* a transactional producer, ``transactional.id = <prefix>.costs.tx.<partition>``: starting it fences any
  previous owner of the partition and aborts its open transaction;
* state restored from that partition of ``<prefix>.costs.totals`` (read to its end, committed records
  only): the totals, each run's highest counted seq and agents, and the coverage record (``_source``): the
  source offset below which everything is folded. The consumer seeks there, not to a committed offset;
* per batch of events: the fold in memory (``calmrun.costs.fold``), then one transaction holding every
  changed total, each touched tenant's current window spend (``<prefix>.costs.tenants``), the coverage
  record and the consumed offsets (``send_offsets_to_transaction``). A crash at any point leaves either
  all of a batch or none of it; the next owner restarts exactly at the coverage.

Gaps: offsets are expected in sequence from the coverage on. A jump (the next record is above the
expected offset) is re-read from Kafka with a second consumer; records found there are folded first, in
offset order, counted in ``calmrun_costs_repairs_total`` and logged. A range with no records (transaction
markers, aborted records, retention) is covered without a repair. When a partition is idle and the
consumer's position is past the coverage (a trailing transaction marker), the same check covers it.

A failed transaction leaves the in-memory fold ahead of what Kafka holds, so it ends the process (exit 1);
a restart restores from the last committed batch. A fenced producer (another aggregator took the
partition) drops the partition instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import IllegalStateError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from calmrun.costs.costtopics import CostTopics, ensure_cost_topics
from calmrun.costs.fold import PartitionFold
from calmrun.costs.peek import folded_type
from calmrun.errors import DecodeError
from calmrun.kafka.connect import TXN_RETRY_BACKOFF_MS, client_kwargs
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import start_client
from calmrun.settings import Settings
from calmrun.wire.avro import AvroCodec
from calmrun.wire.codec import NAMESPACE, wire_codec

log = logging.getLogger("calmrun.costs")

EVENT_SCHEMA = f"{NAMESPACE}.RunEvent"
Record: TypeAlias = ConsumerRecord[bytes, bytes]


def retention_ms(settings: Settings) -> dict[str, int]:
    return {w: s * 1000 for w, s in settings.costs.retention_s.items()}


class AggregatorMetrics:
    """The aggregator's Prometheus metrics, in the registry passed in.

    ``calmrun_costs_lag_events`` and ``calmrun_costs_covered_offset`` (per source partition) are read from
    the aggregator when scraped.
    """

    def __init__(self, registry: CollectorRegistry, agg: Aggregator) -> None:
        self.events = Counter(
            "calmrun_costs_events", "Events folded (or skipped) by the aggregator.", registry=registry
        )
        self.attempts = Counter("calmrun_costs_attempts", "Priced attempts counted.", registry=registry)
        self.duplicates = Counter(
            "calmrun_costs_duplicates",
            "Copies of an already counted (run_id, seq), not counted.",
            registry=registry,
        )
        self.repairs = Counter(
            "calmrun_costs_repairs", "Events found by re-reading a skipped offset range.", registry=registry
        )
        self.undecodable = Counter(
            "calmrun_costs_undecodable", "Event records that did not decode.", registry=registry
        )
        self.batches = Counter(
            "calmrun_costs_batches", "Transactions committed (one per batch).", registry=registry
        )
        registry.register(_Gauges(agg))


class _Gauges(Collector):
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    def collect(self) -> Iterable[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "calmrun_costs_lag_events",
            "Events on the events topic not yet in the totals.",
            labels=("partition",),
        )
        covered = GaugeMetricFamily(
            "calmrun_costs_covered_offset",
            "Source offset below which the totals are complete.",
            labels=("partition",),
        )
        for p, n in sorted(self.agg.lag().items()):
            lag.add_metric((str(p),), n)
        for p, fold in sorted(self.agg.folds.items()):
            covered.add_metric((str(p),), fold.next_offset)
        return (lag, covered)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.agg.release([tp.partition for tp in revoked if tp.topic == self.agg.topics.events])

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.agg.claim([tp.partition for tp in assigned if tp.topic == self.agg.topics.events])


class Aggregator:
    """The cost aggregator over the events topic; ``await run(stopping)`` until ``stopping`` is set.

    Args:
        settings: Kafka (bootstrap, prefix, partitions) and ``costs`` settings.
        registry: where its metrics go (a fresh ``CollectorRegistry`` by default).
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.topics = CostTopics(settings.kafka.prefix)
        self.group = self.topics.group(settings)
        self.registry = registry or CollectorRegistry()
        self.metrics = AggregatorMetrics(self.registry, self)
        self.folds: dict[int, PartitionFold] = {}
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._codec = wire_codec(settings.wire)  # Confluent-framed events decode through the registry
        self._avro: AvroCodec = self._codec.avro
        self._header = self._avro.header(EVENT_SCHEMA)
        self._lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()  # one re-read (or restore) at a time on the second consumer
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: AIOKafkaConsumer | None = None

    # -- partitions -------------------------------------------------------------------------------

    async def claim(self, partitions: list[int]) -> None:
        """Own these source partitions: fence their previous owner, restore their totals, seek."""
        if not partitions:
            return
        async with self._lock:
            k = self.settings.kafka
            for p in partitions:
                producer = AIOKafkaProducer(
                    bootstrap_servers=k.bootstrap,
                    client_id=f"{k.client_id}-costs-{p}",
                    transactional_id=self.topics.transactional_id(p),
                    enable_idempotence=True,
                    acks="all",
                    linger_ms=5,
                    max_batch_size=256 * 1024,
                    retry_backoff_ms=TXN_RETRY_BACKOFF_MS,  # see calmrun.kafka.connect
                    **client_kwargs(k),
                )
                await start_client(producer, k)  # init_transactions: fences, aborts the old one
                self._producers[p] = producer
            folds = {p: PartitionFold(p, retention_ms(self.settings)) for p in partitions}
            assert self._reader is not None
            tps = [TopicPartition(self.topics.totals, p) for p in partitions]
            async with self._read_lock:
                async for rec in read_to_end(self._reader, tps):
                    folds[rec.partition].restore(rec.key or b"", rec.value)
            assert self._consumer is not None
            for p, fold in folds.items():
                self.folds[p] = fold
                self._consumer.seek(TopicPartition(self.topics.events, p), fold.next_offset)
                log.info(
                    "costs: partition %d restored: covered below offset %d, %d totals, %d runs",
                    p,
                    fold.next_offset,
                    len(fold.totals),
                    len(fold.runs),
                )

    async def release(self, partitions: list[int]) -> None:
        """Give these partitions up (after the batch in progress, which commits or fails first)."""
        async with self._lock:
            for p in partitions:
                self.folds.pop(p, None)
                producer = self._producers.pop(p, None)
                if producer is not None:
                    await producer.stop()

    # -- batches ----------------------------------------------------------------------------------

    def _fold(self, fold: PartitionFold, rec: Record) -> None:
        body = rec.value or b""
        if folded_type(body, self._header) is False:
            fold.cover(rec.offset)  # an event type the fold does not use: no decoding
            return
        try:
            name, ev = self._codec.read_avro(body)
            if name != EVENT_SCHEMA:
                raise DecodeError(f"expected RunEvent, got {name}", topic=rec.topic, offset=rec.offset)
        except DecodeError as exc:
            log.warning(
                "costs: skipping undecodable event %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc
            )
            self.metrics.undecodable.inc()
            fold.cover(rec.offset)
            return
        fold.apply(ev, rec.offset)

    async def _reread(self, p: int, gaps: list[tuple[int, int]]) -> list[Record]:
        """The records in these offset ranges of source partition ``p`` (committed ones), read again."""
        async with self._read_lock:
            return await self._read_range(p, gaps)

    async def _read_range(self, p: int, gaps: list[tuple[int, int]]) -> list[Record]:
        assert self._reader is not None
        tp = TopicPartition(self.topics.events, p)
        self._reader.assign([tp])
        found: list[Record] = []
        lo, hi = gaps[0][0], gaps[-1][1]
        self._reader.seek(tp, lo)
        while await self._reader.position(tp) < hi:
            batch = await self._reader.getmany(tp, timeout_ms=500, max_records=10_000)
            for rec in batch.get(tp, []):
                if rec.offset >= hi:
                    break
                if any(a <= rec.offset < b for a, b in gaps):
                    found.append(rec)
            if not batch and await self._reader.position(tp) < hi:
                end = (await self._reader.end_offsets([tp]))[tp]
                if end <= await self._reader.position(tp):
                    break  # nothing more is readable (the range lies past the committed end)
        return found

    async def _batch(self, p: int, records: list[Record]) -> None:
        fold = self.folds[p]
        expected = fold.next_offset
        gaps: list[tuple[int, int]] = []
        for rec in records:
            if rec.offset > expected:
                gaps.append((expected, rec.offset))
            expected = max(expected, rec.offset + 1)
        if gaps:
            found = await self._reread(p, gaps)
            for rec in found:
                log.warning(
                    "costs: repaired %s[%d]@%d: the consumer skipped it, a re-read found it",
                    rec.topic,
                    p,
                    rec.offset,
                )
            if found:
                fold.repairs += len(found)
                self.metrics.repairs.inc(len(found))
                records = sorted([*records, *found], key=lambda r: r.offset)
        counted, duplicates = fold.counted, fold.duplicates
        for rec in records:
            self._fold(fold, rec)
        self.metrics.events.inc(len(records))
        self.metrics.attempts.inc(fold.counted - counted)
        self.metrics.duplicates.inc(fold.duplicates - duplicates)
        await self._commit(p, fold)

    async def _settle(self, p: int) -> None:
        """An idle partition whose position is past its coverage: check the range, then cover it."""
        assert self._consumer is not None
        fold = self.folds[p]
        try:
            tp = TopicPartition(self.topics.events, p)
            position = await asyncio.wait_for(self._consumer.position(tp), 0.5)
        except (IllegalStateError, TimeoutError):
            return  # revoked meanwhile, or not positioned yet after an assignment: nothing to settle
        if position <= fold.next_offset:
            return
        found = await self._reread(p, [(fold.next_offset, position)])
        if found:
            fold.repairs += len(found)
            self.metrics.repairs.inc(len(found))
            for rec in found:
                log.warning("costs: repaired %s[%d]@%d while idle", rec.topic, p, rec.offset)
                self._fold(fold, rec)
        fold.next_offset = max(fold.next_offset, position)
        await self._commit(p, fold)

    async def _commit(self, p: int, fold: PartitionFold) -> None:
        producer = self._producers[p]
        totals, tenants = fold.drain()
        try:
            async with producer.transaction():
                for key, value in totals:
                    await producer.send(self.topics.totals, value=value, key=key, partition=p)
                for key, body in tenants:
                    await producer.send(self.topics.tenants, value=body, key=key, partition=p)
                await producer.send_offsets_to_transaction(
                    {TopicPartition(self.topics.events, p): OffsetAndMetadata(fold.next_offset, "")},
                    self.group,
                )
        except ProducerFenced:
            log.warning("costs: partition %d was taken over by another aggregator; dropping it", p)
            self.folds.pop(p, None)
            self._producers.pop(p, None)
            return
        self.metrics.batches.inc()

    async def _poll(self, wait_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        """The next records of the owned partitions (one ``getmany``)."""
        assert self._consumer is not None
        batch: dict[TopicPartition, list[Record]] = await self._consumer.getmany(
            timeout_ms=wait_ms, max_records=max_records
        )
        return batch

    def lag(self) -> dict[int, int]:
        """Per owned source partition: the consumer's last stable offset minus the coverage."""
        out: dict[int, int] = {}
        consumer = self._consumer
        if consumer is None:
            return out
        for p, fold in list(self.folds.items()):
            tp = TopicPartition(self.topics.events, p)
            end = consumer.last_stable_offset(tp)
            if end is None:
                end = consumer.highwater(tp)
            if end is not None:
                out[p] = max(0, end - fold.next_offset)
        return out

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Create the topics, join the group and fold until ``stopping`` is set; then leave cleanly.

        Raises:
            BrokerUnavailableError: no broker answers.
            KafkaError: a transaction failed (the fold in memory is then ahead of Kafka: restart).
        """
        k, c = self.settings.kafka, self.settings.costs
        await ensure_cost_topics(self.settings)
        self._reader = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            client_id=f"{k.client_id}-costs-restore",
            **client_kwargs(k),
        )
        await start_client(self._reader, k)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            group_id=self.group,
            client_id=f"{k.client_id}-costs",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            session_timeout_ms=int(c.session_timeout_s * 1000),
            heartbeat_interval_ms=int(c.session_timeout_s * 1000 / 3),
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
            **client_kwargs(k),
        )
        self._consumer.subscribe([self.topics.events], listener=_Rebalance(self))
        try:
            await start_client(self._consumer, k)
            wait_ms = int(c.emit_interval_s * 1000)
            while not stopping.is_set():
                batch = await self._poll(wait_ms, c.max_batch)
                async with self._lock:
                    work = {
                        tp.partition: recs
                        for tp, recs in batch.items()
                        if recs and tp.partition in self.folds
                    }
                    await asyncio.gather(*(self._batch(p, recs) for p, recs in work.items()))
                    for p in [p for p in list(self.folds) if p not in work]:
                        await self._settle(p)
        finally:
            await self._consumer.stop()  # leaves the group: revokes (and so stops the producers) first
            for producer in self._producers.values():
                await producer.stop()
            await self._reader.stop()

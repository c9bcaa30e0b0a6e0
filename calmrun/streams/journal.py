"""The agent journal over Kafka: ``<prefix>.agents.journal``, keyed by run ID, co-partitioned with the runs.

Records are written by an idempotent producer with ``acks=all`` and each write is awaited before the agent
continues, so an acknowledged entry survives the worker. The journal is its own topic, not the events topic:
entries are many and large (model responses, tool outputs) and only a resumed or replayed attempt reads
them, while every events reader (the decider's history, the cost aggregator, the history checker, the
operator page) would otherwise read them all. It is not written in the partition's transaction either: an
entry must be durable before the agent's next call, which would commit the partition's whole batch (every
other run's decisions) once per model request, and a pooled step's executor owns no partition writer. Zombies
are fenced by the claims of ``agents.journal`` instead.

Reading an attempt's chain seeks its partition to the time the attempt can have started (``since_ms``, from
``offsets_for_times``) and reads to the end offset taken when the read starts.

What a reader keeps: a worker reads each partition forward once and holds the records of the attempts that
have not ended here (one may still load its chain), never those of an attempt that ended here, whose records
often arrive after it ended (read for another attempt's load). It remembers the last ``ENDED`` attempts that
ended, and a load it can no longer vouch for (an ended attempt, or one that may have started before what the
reader holds) reads its chain from the log instead. In the soak's triage workflow the held records were
about 50 KiB per finished run, never released (``bench/retained.py``; ``docs/performance.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from calmrun.agents.journal import RESUME_MARGIN_MS, Claim, Entry, Part, chain, decode, encode, split
from calmrun.agents.requestcosts import RequestCost, run_request_costs
from calmrun.costs.pricing import Pricing
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import Topics, partition_for, start_client
from calmrun.settings import Settings

RECORD_ROOM = 16_384
"""Bytes under ``kafka.max_request_size`` left for a record's key, headers and batch overhead."""

ENDED = 10_000
"""Attempts that ended here a reader remembers (their records, read later, are dropped); past that, the
oldest is forgotten and a load of an attempt that may have started before it ended reads the log."""

IDLE_READS = 200
"""A partition no load asked for in this many reads is no longer read (its records are dropped)."""


class KafkaJournal:
    """The journal store over Kafka (``agents.journal.JournalStore``); clients start on first use."""

    def __init__(
        self,
        settings: Settings,
        limit: int | None = None,
        *,
        ended: int = ENDED,
        idle_reads: int = IDLE_READS,
        clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.topic = Topics(settings.kafka.prefix).journal
        self.limit = limit or settings.kafka.max_request_size - RECORD_ROOM
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._start = asyncio.Lock()
        self._read = asyncio.Lock()
        self._tails: dict[int, _Tail] = {}
        self._wanted: dict[int, int] = {}  # partition -> since_ms of its first load, until its tail exists
        self._asked = self._covered = 0  # loads asked / covered by a finished read (see load)
        self._reads = 0  # forward reads done
        # attempt key -> when it ended here, oldest first (an OrderedDict: dropping the oldest of a dict
        # whose front was popped many times scans the freed slots, 2 µs a call at 10,000 here)
        self._ended: OrderedDict[str, int] = OrderedDict()
        self._horizon_ms = 0  # a load from before this may miss records dropped for a forgotten ended attempt
        self._max_ended, self._idle_reads, self._clock = ended, idle_reads, clock

    def partition(self, run_id: str) -> int:
        return partition_for(run_id, self.settings.kafka.partitions)

    async def append(self, run_id: str, record: Entry | Claim) -> int:
        """Write ``record`` (in parts when over the limit); wait for every part's acknowledgement."""
        producer = await self._producer_started()
        blobs = split(record, self.limit) if isinstance(record, Entry) else [encode(record)]
        for blob in blobs:
            await producer.send_and_wait(
                self.topic, blob, key=run_id.encode(), partition=self.partition(run_id)
            )
        return sum(len(b) for b in blobs)

    async def load(self, run_id: str, attempt_key: str, since_ms: int) -> list[Entry]:
        """The chain of ``attempt_key`` from the records written at ``since_ms`` or later.

        A worker reads each journal partition once, forward, and keeps the records by attempt until the
        attempt is forgotten, so a load reads only what was written since the previous read; loads that
        arrive while a read runs share the next one (attempts starting together wait for one read, not
        one each). An attempt that ended here and runs again, or one that can have started before the
        partition's reading began, is read from the log (see the module docstring).
        """
        p = self.partition(run_id)
        if not self._vouched(self._tails.get(p), attempt_key, since_ms):
            return chain(await self.records(run_id, since_ms), attempt_key)
        self._wanted.setdefault(p, since_ms)
        self._asked += 1
        ticket = self._asked
        async with self._read:
            if self._covered < ticket:  # no read started after this load arrived has finished
                upto = self._asked
                await self._read_forward()
                self._covered = upto
        tail = self._tails.get(p)
        if tail is not None:
            self._sweep(tail, since_ms)
        if tail is None or not self._vouched(tail, attempt_key, since_ms):  # it started before the tail
            return chain(await self.records(run_id, since_ms), attempt_key)
        return chain(list(tail.by_key.get(attempt_key, ())), attempt_key)

    def _vouched(self, tail: _Tail | None, attempt_key: str, since_ms: int) -> bool:
        """Whether the records held (or to be read, for a partition not read yet) are the whole chain of an
        attempt that can have started at ``since_ms``: not one that ended here, nor one that started before
        the partition's reading began or before an ended attempt whose records were dropped was forgotten."""
        if attempt_key in self._ended or since_ms < self._horizon_ms:
            return False
        return tail is None or since_ms >= tail.from_ms

    def held(self) -> dict[str, int]:
        """What this reader holds: partitions read, attempts and records held, ended attempts remembered."""
        return {
            "partitions": len(self._tails),
            "attempts": sum(len(t.by_key) for t in self._tails.values()),
            "records": sum(len(v) for t in self._tails.values() for v in t.by_key.values()),
            "ended": len(self._ended),
        }

    async def _read_forward(self) -> None:
        """Read every partition loads asked for from where it was left to its end offset now."""
        consumer = await self._consumer_started()
        parts = sorted(set(self._tails) | set(self._wanted))
        tps = [TopicPartition(self.topic, p) for p in parts]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            if tp.partition not in self._tails:
                since = self._wanted[tp.partition]
                found = (await consumer.offsets_for_times({tp: since}))[tp] if since > 0 else None
                start = found.offset if found is not None else ends[tp] if since else 0
                self._tails[tp.partition] = _Tail(start, from_ms=since, asked=self._reads)
        for tp in tps:  # only those read now: a load that asked meanwhile is read by the next read
            if self._wanted.pop(tp.partition, None) is not None:
                self._tails[tp.partition].asked = self._reads
        for tp in tps:  # every assigned partition gets a position at once: none is fetched from its start
            consumer.seek(tp, min(self._tails[tp.partition].position, ends[tp]))
        for tp in tps:
            tail, end = self._tails[tp.partition], ends[tp]
            if tail.position >= end:
                continue
            while await consumer.position(tp) < end:
                for rec in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, ()):
                    if rec.offset < end and rec.value is not None:
                        with contextlib.suppress(ValueError):
                            record = decode(rec.value)
                            if record.attempt_key not in self._ended:  # ended here: no load will ask
                                tail.add(record, rec.timestamp)
            tail.position = end
        self._reads += 1
        for p in [p for p, t in self._tails.items() if self._reads - t.asked > self._idle_reads]:
            del self._tails[p]  # no attempt here loads from it (it moved): a later load starts a new tail

    def forget(self, attempt_key: str) -> None:
        """Drop what :meth:`load` keeps of an attempt that ended, and what is read of it later."""
        for tail in self._tails.values():
            tail.by_key.pop(attempt_key, None)
            tail.last_ms.pop(attempt_key, None)
        self._end(attempt_key, self._clock())

    def _end(self, attempt_key: str, at_ms: int) -> None:
        self._ended.pop(attempt_key, None)
        self._ended[attempt_key] = at_ms
        while len(self._ended) > self._max_ended:  # the oldest: a load that may precede it reads the log
            _, oldest_ms = self._ended.popitem(last=False)
            self._horizon_ms = max(self._horizon_ms, oldest_ms + 1)

    def _sweep(self, tail: _Tail, since_ms: int, keep: int = 10_000) -> None:
        """Past ``keep`` attempts held, drop those with no record since ``since_ms`` (ended elsewhere, or long
        ago): they count as ended here (a load of one reads the log)."""
        if len(tail.by_key) <= keep:
            return
        for key in [k for k, at in tail.last_ms.items() if at < since_ms]:
            tail.by_key.pop(key, None)
            self._end(key, tail.last_ms.pop(key))

    async def records(self, run_id: str, since_ms: int = 0) -> list[Entry | Claim | Part]:
        """Every journal record of ``run_id`` written at ``since_ms`` or later, in log order."""
        consumer = await self._consumer_started()
        tp = TopicPartition(self.topic, self.partition(run_id))
        key = run_id.encode()
        out: list[Entry | Claim | Part] = []
        if self.topic not in await consumer.topics():  # no agent journaled yet under this prefix
            return out
        async with self._read:
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            if since_ms <= 0:
                start = (await consumer.beginning_offsets([tp]))[tp]
            else:
                found = (await consumer.offsets_for_times({tp: since_ms}))[tp]
                start = found.offset if found is not None else end
            if start >= end:
                return out
            consumer.seek(tp, start)
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for rec in batch.get(tp, ()):
                    if rec.offset >= end:
                        break
                    if rec.key == key and rec.value is not None:
                        with contextlib.suppress(ValueError):
                            out.append(decode(rec.value))
        return out

    async def close(self) -> None:
        for client in (self._producer, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._producer = self._consumer = None

    async def _producer_started(self) -> AIOKafkaProducer:
        async with self._start:
            if self._producer is None:
                k = self.settings.kafka
                producer = AIOKafkaProducer(
                    bootstrap_servers=k.bootstrap,
                    client_id=f"{k.client_id}-journal",
                    enable_idempotence=True,
                    acks="all",
                    linger_ms=0,
                    max_request_size=max(k.max_request_size, self.limit + RECORD_ROOM),
                    **client_kwargs(k),
                )
                await start_client(producer, k)
                self._producer = producer
            return self._producer

    async def _consumer_started(self) -> AIOKafkaConsumer:
        async with self._start:
            if self._consumer is None:
                k = self.settings.kafka
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=k.bootstrap,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    isolation_level="read_committed",
                    client_id=f"{k.client_id}-journal-read",
                    **client_kwargs(k),
                )
                await start_client(consumer, k)
                self._consumer = consumer
            return self._consumer


@dataclass
class _Tail:
    """What :meth:`KafkaJournal.load` read of a partition (``from_ms`` to ``position``), by attempt."""

    position: int
    from_ms: int = 0  # records written before this were not read (the first load's since_ms)
    asked: int = 0  # the reader's read count when a load last asked for this partition
    by_key: dict[str, list[Entry | Claim | Part]] = field(default_factory=dict)
    last_ms: dict[str, int] = field(default_factory=dict)

    def add(self, rec: Entry | Claim | Part, at_ms: int) -> None:
        self.by_key.setdefault(rec.attempt_key, []).append(rec)
        self.last_ms[rec.attempt_key] = at_ms


def run_since(created_ms: int | None) -> int:
    """Where a run's journal records start: its creation, less a margin for the producers' clocks."""
    return max(0, created_ms - RESUME_MARGIN_MS) if created_ms else 0


def by_attempt(records: Iterable[Entry | Claim | Part]) -> dict[str, list[Entry]]:
    """The chain of every attempt found in ``records`` (attempt key -> entries), in first-seen order."""
    recs = list(records)
    keys = list(dict.fromkeys(r.attempt_key for r in recs))
    return {k: chain(recs, k) for k in keys}


async def journal_entries(settings: Settings, run_id: str, since_ms: int = 0) -> list[Entry]:
    """Every counted entry of ``run_id``'s attempts (their chains, attempt after attempt), from the
    records written at ``since_ms`` or later (the run's creation time: see :func:`run_since`)."""
    journal = KafkaJournal(settings)
    try:
        return [e for chain in by_attempt(await journal.records(run_id, since_ms)).values() for e in chain]
    finally:
        await journal.close()


async def read_request_costs(settings: Settings, run_id: str, created_ms: int = 0) -> list[RequestCost]:
    """:func:`run_request_costs` of ``run_id``, its journal read from ``<prefix>.agents.journal`` (from the
    run's creation, ``created_ms``, when given)."""
    journal = KafkaJournal(settings)
    try:
        records = await journal.records(run_id, run_since(created_ms))
    finally:
        await journal.close()
    return run_request_costs(records, Pricing.from_settings(settings))

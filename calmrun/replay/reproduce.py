"""Offset and time replay: re-produce a range of a topic's records, into a shadow namespace or live.

Records keep their key, their headers and their partition (so co-partitioning by run ID holds), and gain
the header ``calmrun-replayed-from: <topic>[<partition>]@<offset>``. ``shadow:NAME`` maps
``<prefix>.X`` to ``NAME.X`` (created on demand with the source's partition count), which a worker started
with prefix NAME processes: production topics and state are never written. ``live`` writes back into the
source topic and needs an explicit confirmation. Every argument is checked and the range resolved before
the first record is produced: a bad argument or an empty range writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from calmrun.errors import ReplayArgumentError
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import admin_client, new_topic, start_client
from calmrun.settings import Settings

REPLAYED_FROM = "calmrun-replayed-from"
"""Header added to every replayed record: ``<source topic>[<partition>]@<offset>``."""

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_COMPACTED = ("runs.state",)


@dataclass(frozen=True)
class Target:
    """Where replayed records go: ``live`` (the source topic) or a shadow prefix."""

    shadow: str | None

    @classmethod
    def parse(cls, into: str, source_prefix: str) -> Target:
        """``live`` or ``shadow:NAME``.

        Raises:
            ReplayArgumentError: anything else, a NAME that is no valid prefix, or the production prefix.
        """
        if into == "live":
            return cls(None)
        kind, _, name = into.partition(":")
        if kind != "shadow" or not name:
            raise ReplayArgumentError(f"--into must be 'live' or 'shadow:NAME', not {into!r}")
        if not _PREFIX.match(name):
            raise ReplayArgumentError(
                f"shadow namespace {name!r} is not a valid topic prefix (letters, digits, '_' and '-')"
            )
        if name == source_prefix:
            raise ReplayArgumentError(f"shadow namespace {name!r} is the production prefix itself")
        return cls(name)


@dataclass(frozen=True)
class Span:
    """Offsets ``[start, end)`` of one partition selected for replay."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


@dataclass
class OffsetReplay:
    """What an offset replay did (or, with ``dry_run``, would do)."""

    source: str
    target: str
    into: str
    spans: list[Span]
    selected: int
    replayed: int = 0
    filtered: int = 0
    elapsed_s: float = 0.0
    by_partition: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.replayed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "into": self.into,
            "spans": [{"partition": s.partition, "start": s.start, "end": s.end} for s in self.spans],
            "selected": self.selected,
            "replayed": self.replayed,
            "filtered": self.filtered,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.rate, 1),
            "by_partition": self.by_partition,
        }


Progress = Callable[[int, int], None]
"""``(records done, records selected)``, called as records are produced."""


async def replay_offsets(
    settings: Settings,
    topic: str,
    *,
    into: str,
    from_offset: int | None = None,
    from_time_ms: int | None = None,
    to_offset: int | None = None,
    to_time_ms: int | None = None,
    partitions: Sequence[int] | None = None,
    run_ids: Sequence[str] | None = None,
    confirm_live: bool = False,
    rate: float | None = None,
    on_progress: Progress | None = None,
) -> OffsetReplay:
    """Re-produce the selected records of ``topic``.

    Args:
        settings: Kafka settings; ``kafka.prefix`` is the production namespace.
        topic: a topic name, or its name under the prefix (``runs.requests``).
        into: ``live`` or ``shadow:NAME``.
        from_offset: first offset, in every selected partition (exactly one of ``from_*``).
        from_time_ms: first record with a timestamp at or after this (epoch ms).
        to_offset: last offset to replay, inclusive (default: the end when the replay starts).
        to_time_ms: replay records with a timestamp before this (exclusive).
        partitions: only these partitions (default all).
        run_ids: only records whose key is one of these run IDs.
        confirm_live: required for ``into="live"``.
        rate: at most this many records per second.
        on_progress: called with (done, selected) as records go out.

    Returns:
        What was replayed. The end offsets are fixed when the replay starts, so a live replay never
        re-reads its own output.

    Raises:
        ReplayArgumentError: bad arguments, unknown topic or partition, offset out of range, empty range,
            or no record matched ``run_ids``; nothing was written.
        BrokerUnavailableError: the broker does not answer.
    """
    if (from_offset is None) == (from_time_ms is None):
        raise ReplayArgumentError("give exactly one of --from-offset and --from-time")
    if to_offset is not None and to_time_ms is not None:
        raise ReplayArgumentError("give at most one of --to-offset and --to-time")
    if from_offset is not None and from_offset < 0:
        raise ReplayArgumentError(f"--from-offset {from_offset} is negative")
    if rate is not None and rate <= 0:
        raise ReplayArgumentError(f"--rate must be positive, not {rate}")
    k = settings.kafka
    target = Target.parse(into, k.prefix)
    if target.shadow is None and not confirm_live:
        raise ReplayArgumentError(
            "--into live writes into production topics: add --yes-live to confirm, or use --into shadow:NAME"
        )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="none",
        isolation_level="read_committed",
        client_id=f"{k.client_id}-replay",
        **client_kwargs(k),
    )
    await start_client(consumer, k)
    producer: AIOKafkaProducer | None = None
    try:
        source, count = await _resolve_topic(settings, topic)
        if target.shadow is None:
            dest = source
        elif source.startswith(f"{k.prefix}."):
            dest = f"{target.shadow}.{source[len(k.prefix) + 1 :]}"
        else:
            raise ReplayArgumentError(
                f"shadow replay maps {k.prefix}.X to {target.shadow}.X, and {source} is not under the prefix "
                f"{k.prefix!r} (set --prefix)"
            )
        spans = await _spans(
            consumer, source, count, partitions, from_offset, from_time_ms, to_offset, to_time_ms
        )
        selected = sum(s.size for s in spans)
        report = OffsetReplay(source, dest, into, spans, selected)
        if selected == 0:
            raise ReplayArgumentError(f"the range selects no record of {source}: {_describe(spans)}")
        wanted = {r.encode() for r in run_ids} if run_ids else None
        t0 = time.perf_counter()
        pending: list[asyncio.Future[Any]] = []
        done = 0
        tps = [TopicPartition(source, s.partition) for s in spans if s.size]
        ends = {TopicPartition(source, s.partition): s.end for s in spans}
        consumer.assign(tps)
        for s in spans:
            if s.size:
                consumer.seek(TopicPartition(source, s.partition), s.start)
        remaining = set(tps)
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=2000)
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset >= ends[tp]:
                        continue
                    done += 1
                    if wanted is not None and rec.key not in wanted:
                        report.filtered += 1
                        continue
                    if producer is None:  # the first record to write: only now is anything created
                        if target.shadow is not None:
                            await _ensure_topic(settings, dest, count)
                        producer = await _producer(settings)
                    headers = [
                        *rec.headers,
                        (REPLAYED_FROM, f"{source}[{rec.partition}]@{rec.offset}".encode()),
                    ]
                    pending.append(
                        await producer.send(
                            dest, rec.value, key=rec.key, partition=rec.partition, headers=headers
                        )
                    )
                    report.replayed += 1
                    report.by_partition[rec.partition] = report.by_partition.get(rec.partition, 0) + 1
                    if len(pending) >= 5000:
                        await asyncio.gather(*pending)
                        pending.clear()
                    if rate is not None:
                        ahead = report.replayed / rate - (time.perf_counter() - t0)
                        if ahead > 0:
                            await asyncio.gather(*pending)
                            pending.clear()
                            await asyncio.sleep(ahead)
                if on_progress is not None:
                    on_progress(done, selected)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        if pending:
            await asyncio.gather(*pending)
        if producer is not None:
            await producer.flush()
        report.elapsed_s = time.perf_counter() - t0
        if on_progress is not None:
            on_progress(selected, selected)
        if report.replayed == 0:
            raise ReplayArgumentError(
                f"no record in the range of {source} has one of the keys {sorted(run_ids or [])}; "
                "nothing was written"
            )
        return report
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()


async def _resolve_topic(settings: Settings, topic: str) -> tuple[str, int]:
    """The topic's full name and partition count (``topic`` may be named relative to the prefix)."""
    k = settings.kafka
    async with admin_client(k, "replay") as admin:
        existing = set(await admin.list_topics())
        for name in (topic, f"{k.prefix}.{topic}"):
            if name in existing:
                meta = (await admin.describe_topics([name]))[0]
                return name, len(meta["partitions"])
    ours = sorted(t for t in existing if t.startswith(f"{k.prefix}."))
    known = ", ".join(ours[:20]) + (" ..." if len(ours) > 20 else "") if ours else "none"
    raise ReplayArgumentError(f"unknown topic {topic!r} (topics under {k.prefix!r}: {known})")


async def _spans(
    consumer: AIOKafkaConsumer,
    topic: str,
    count: int,
    partitions: Sequence[int] | None,
    from_offset: int | None,
    from_time_ms: int | None,
    to_offset: int | None,
    to_time_ms: int | None,
) -> list[Span]:
    parts = sorted(set(partitions)) if partitions else list(range(count))
    bad = [p for p in parts if not 0 <= p < count]
    if bad:
        raise ReplayArgumentError(f"{topic} has partitions 0..{count - 1}; no partition {bad[0]}")
    tps = [TopicPartition(topic, p) for p in parts]
    low = await consumer.beginning_offsets(tps)
    high = await consumer.end_offsets(tps)
    starts: dict[TopicPartition, int] = {}
    ends: dict[TopicPartition, int] = {}
    if from_time_ms is not None:
        found = await consumer.offsets_for_times({tp: from_time_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            starts[tp] = at.offset if at is not None else high[tp]
    else:
        assert from_offset is not None
        for tp in tps:
            if not low[tp] <= from_offset <= high[tp]:
                raise ReplayArgumentError(
                    f"--from-offset {from_offset} is out of range for {topic}[{tp.partition}]: "
                    f"it holds offsets {low[tp]}..{high[tp] - 1}"
                    + ("" if partitions else " (choose --partition)")
                )
            starts[tp] = from_offset
    if to_time_ms is not None:
        found = await consumer.offsets_for_times({tp: to_time_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            ends[tp] = at.offset if at is not None else high[tp]
    elif to_offset is not None:
        for tp in tps:
            if to_offset >= high[tp] or to_offset < starts[tp]:
                raise ReplayArgumentError(
                    f"--to-offset {to_offset} is out of range for {topic}[{tp.partition}]: "
                    "the range starts at "
                    f"{starts[tp]} and the last offset is {high[tp] - 1}"
                )
            ends[tp] = to_offset + 1
    else:
        ends = dict(high)
    return [Span(tp.partition, starts[tp], max(starts[tp], ends[tp])) for tp in tps]


def _describe(spans: Sequence[Span]) -> str:
    return ", ".join(f"[{s.partition}] {s.start}..{s.end}" for s in spans)


async def _producer(settings: Settings) -> AIOKafkaProducer:
    k = settings.kafka
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap,
        client_id=f"{k.client_id}-replay",
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
        **client_kwargs(k),
    )
    await start_client(producer, k)
    return producer


async def _ensure_topic(settings: Settings, topic: str, partitions: int) -> None:
    k = settings.kafka
    admin = AIOKafkaAdminClient(
        bootstrap_servers=k.bootstrap, client_id=f"{k.client_id}-replay", **client_kwargs(k)
    )
    await admin.start()
    try:
        if topic in set(await admin.list_topics()):
            meta = (await admin.describe_topics([topic]))[0]
            if len(meta["partitions"]) < partitions:
                raise ReplayArgumentError(
                    f"shadow topic {topic} has {len(meta['partitions'])} partitions, fewer than the source's "
                    f"{partitions}"
                )
            return
        config = {"cleanup.policy": "compact"} if topic.endswith(_COMPACTED) else {}
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([new_topic(topic, partitions, k.replication_factor, config)])
    finally:
        await admin.close()

"""Reading the aggregator's output: ``<prefix>.costs.totals`` as a table, ``<prefix>.costs.tenants`` as spend.

Both topics are compacted and keyed per source partition (each partition of the events topic has its own
partial sums); readers add the partitions up. They are as current as the aggregator: it writes changed totals
every ``costs.emit_interval_s`` after folding the events, so a figure read here lags the events topic by the
aggregator's consumer lag plus that interval (eventual consistency; a tenant's budget can be overrun by the
runs admitted during that lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.codec import RecordCodec, wire_models
from calmrun.connect import client_kwargs
from calmrun.costs.aggregator import (
    ALL,
    PUBLIC_FIELDS,
    WINDOW_MS,
    CostFold,
    CostTopics,
    bucket_start,
    ensure_cost_topics,
    public,
    retention_ms,
)
from calmrun.errors import DecodeError
from calmrun.settings import Settings
from calmrun.streams.topics import start_client
from calmrun.workflow.events import RunEvent

log = logging.getLogger("calmrun.costs")

Apply = Callable[[bytes, bytes | None], None]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class CompactedTail:
    """Reads every partition of a topic from the beginning and keeps following it.

    Args:
        settings: where the broker is and how many partitions calmrun topics have.
        topic: the topic to read.
        apply: called with (key, value) for every record in offset order per partition (value None: deleted);
            with ``raw``, called with the ConsumerRecord.
    """

    def __init__(
        self, settings: Settings, topic: str, apply: Callable[..., None], *, raw: bool = False
    ) -> None:
        self.settings, self.topic, self.apply, self.raw = settings, topic, apply, raw
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self.records = 0
        self.undecodable = 0

    async def start(self) -> None:
        """Assign all partitions, read from the beginning; ``caught_up()`` tells when the end seen at start
        was reached.

        Raises:
            BrokerUnavailableError: no broker answers.
        """
        k = self.settings.kafka
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"{k.client_id}-costs-reader",
            **client_kwargs(k),
        )
        await start_client(self._consumer, k)
        tps = [TopicPartition(self.topic, p) for p in range(k.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        end = await self._consumer.end_offsets(tps)
        self._task = asyncio.create_task(self._run(end))

    async def _run(self, end: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        pending = {tp for tp, off in end.items() if off > 0}
        if not pending:
            self._caught_up.set()
        while True:
            batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for rec in records:
                    self.records += 1
                    try:
                        if self.raw:
                            self.apply(rec)
                        else:
                            self.apply(rec.key or b"", rec.value)
                    # Broad on purpose: a read model of a derived topic has no dead-letter topic; a record
                    # it cannot fold stays in the topic, is counted and logged, and the tail goes on.
                    except Exception as exc:
                        self.undecodable += 1
                        log.warning("%s[%d]@%d not applied: %r", rec.topic, rec.partition, rec.offset, exc)
            if pending:
                for tp in list(pending):
                    if await self._consumer.position(tp) >= end[tp]:
                        pending.discard(tp)
                if not pending:
                    self._caught_up.set()

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

    async def __aenter__(self) -> CompactedTail:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class CostRow:
    """One line of the cost table: a dimension value in one window bucket, summed over partitions."""

    dim: str
    value: str
    window: str
    start_ms: int
    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    api_calls: int = 0
    cost_usd: Decimal = Decimal(0)
    latency_ms: float = 0.0
    queue_wait_ms: float = 0.0

    def add(self, v: dict[str, Any]) -> None:
        for f in PUBLIC_FIELDS:
            if f == "cost_usd":
                self.cost_usd += Decimal(v[f])
            else:
                setattr(self, f, getattr(self, f) + v[f])

    def as_json(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "value": self.value,
            "window": self.window,
            "start_ms": self.start_ms,
            **{f: (str(self.cost_usd) if f == "cost_usd" else getattr(self, f)) for f in PUBLIC_FIELDS},
        }


@dataclass
class CostTable:
    """The latest totals record per key, and the rows they add up to."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def apply(self, key: bytes, value: bytes | None) -> None:
        k = key.decode()
        if value is None:
            self.records.pop(k, None)
            return
        v = json.loads(value)
        missing = {"dim", "value", "window", "start_ms", *PUBLIC_FIELDS} - set(
            v if isinstance(v, dict) else ()
        )
        if missing:
            raise DecodeError(f"a cost total without {sorted(missing)}")
        self.records[k] = v

    def rows(self, by: str | None = None, window: str = ALL, since_ms: int | None = None) -> list[CostRow]:
        """Rows of dimension ``by`` (all dimensions when None) in ``window``; buckets from ``since_ms`` on."""
        out: dict[tuple[str, str, str, int], CostRow] = {}
        for v in self.records.values():
            if (by is not None and v["dim"] != by) or v["window"] != window:
                continue
            if since_ms is not None and window != ALL and v["start_ms"] < bucket_start(since_ms, window):
                continue
            k = (v["dim"], v["value"], v["window"], v["start_ms"])
            row = out.get(k)
            if row is None:
                row = out[k] = CostRow(v["dim"], v["value"], v["window"], v["start_ms"])
            row.add(v)
        return sorted(out.values(), key=lambda r: (r.dim, r.start_ms, -r.cost_usd, r.value))

    def row(self, dim: str, value: str, window: str = ALL, start_ms: int = 0) -> CostRow:
        """One row (zeros when absent)."""
        for r in self.rows(dim, window):
            if r.value == value and r.start_ms == start_ms:
                return r
        return CostRow(dim, value, window, start_ms)


def fold_locally(events: list[tuple[int, int, RunEvent]], settings: Settings | None = None) -> CostTable:
    """What the aggregator's totals must be for these ``(partition, offset, event)``: the same fold on a dict.

    The reference for tests and for checking the aggregator has caught up (``wait_totals``).
    """
    fold = CostFold({}, retention_ms(settings) if settings else {w: 10**15 for w in WINDOW_MS})
    for partition, offset, ev in events:
        fold.apply(ev, partition, offset)
    table = CostTable()
    for key, value in fold.table.items():
        table.records[key] = public(key, value)
    return table


async def read_events(settings: Settings) -> list[tuple[int, int, RunEvent]]:
    """Every record of ``<prefix>.runs.events`` now as ``(partition, offset, event)``; undecodable skipped."""
    codec = RecordCodec(wire_models())
    events: list[tuple[int, int, RunEvent]] = []

    def keep(rec: Any) -> None:
        with contextlib.suppress(DecodeError):
            events.append((rec.partition, rec.offset, codec.decode_as(rec.value or b"", RunEvent)))

    async with CompactedTail(settings, CostTopics(settings.kafka.prefix).events, keep, raw=True) as tail:
        await tail.caught_up()
    return events


async def wait_totals(settings: Settings, expected: CostTable, wait_s: float = 60.0) -> CostTable:
    """Poll ``<prefix>.costs.totals`` until it equals ``expected`` (rows of every dimension, all windows).

    Raises:
        AssertionError: not equal by the deadline (the message shows the workflow rows of both).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    want = _comparable(expected)
    while True:
        got = await read_totals(settings)
        if _comparable(got) == want:
            return got
        if loop.time() > end:
            raise AssertionError(
                f"aggregator totals did not reach the expected ones in {wait_s}s: "
                f"got {[r.as_json() for r in got.rows('workflow')]}, "
                f"want {[r.as_json() for r in expected.rows('workflow')]}"
            )
        await asyncio.sleep(0.3)


def _comparable(t: CostTable) -> dict[tuple[str, str, str, int], tuple[Any, ...]]:
    out: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
    for window in (ALL, *WINDOW_MS):
        for r in t.rows(None, window):
            out[(r.dim, r.value, r.window, r.start_ms)] = (
                r.attempts,
                r.succeeded,
                r.failed,
                r.tokens_in,
                r.tokens_out,
                r.requests,
                r.api_calls,
                r.cost_usd,
                round(r.latency_ms, 3),
                round(r.queue_wait_ms, 3),
            )
    return out


async def read_totals(settings: Settings, wait_s: float = 30.0) -> CostTable:
    """``<prefix>.costs.totals`` as it is now (read to its end offsets)."""
    table = CostTable()
    await ensure_cost_topics(settings)
    async with CompactedTail(settings, CostTopics(settings.kafka.prefix).totals, table.apply) as tail:
        await tail.caught_up(wait_s)
    return table


class TenantSpend:
    """What each tenant spent in its current budget window, from ``<prefix>.costs.tenants``.

    A worker starts one (``async with TenantSpend(settings)``) and asks ``spent(tenant, window)`` when a run
    request arrives. The answer lags the tenant's attempts by the aggregator's lag (eventually consistent):
    runs admitted meanwhile can take a tenant past its budget by what they spend in that time.

    Args:
        settings: broker and prefix.
        clock: wall-clock milliseconds; the current window bucket is taken from it.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], int] = wall_ms) -> None:
        self.clock = clock
        self._latest: dict[tuple[str, str, int], tuple[int, Decimal]] = {}
        self._tail = CompactedTail(settings, CostTopics(settings.kafka.prefix).tenants, self._apply)

    def _apply(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            return
        v = json.loads(value)
        k = (str(v["tenant"]), str(v["window"]), int(v["partition"]))
        start = int(v["start_ms"])
        if k not in self._latest or self._latest[k][0] <= start:
            self._latest[k] = (start, Decimal(v["spent_usd"]))

    def spent(self, tenant: str, window: str, at_ms: int | None = None) -> Decimal:
        """The tenant's spend in the ``window`` bucket holding ``at_ms`` (default now), all partitions."""
        start = bucket_start(self.clock() if at_ms is None else at_ms, window)
        return sum(
            (
                usd
                for (t, w, _), (s, usd) in self._latest.items()
                if t == tenant and w == window and s == start
            ),
            Decimal(0),
        )

    async def start(self) -> None:
        """Create the topic when missing, then read it from the beginning and keep following it."""
        await ensure_cost_topics(self._tail.settings)
        await self._tail.start()

    async def caught_up(self, wait_s: float = 30.0) -> None:
        await self._tail.caught_up(wait_s)

    async def stop(self) -> None:
        await self._tail.stop()

    async def __aenter__(self) -> TenantSpend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

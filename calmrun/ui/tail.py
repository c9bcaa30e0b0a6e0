"""Keeps the index current: one read-committed consumer over the state, events and dead-letter topics.

The consumer is assigned (no group, nothing committed): at start every partition is read from its
beginning, which rebuilds the index; then it follows. Dead-letter topics that appear later (a new
workflow) are picked up by a periodic look at the topic list. A record that does not decode is skipped
on the state and events topics (the worker parks such records, the page only shows them) and kept as an
``undecodable`` dead letter on a DLQ topic, so it is still visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.errors import CalmrunError, DecodeError
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import Topics, start_client
from calmrun.settings import Settings
from calmrun.ui.index import EventRow, RunIndex, event_row
from calmrun.wire.codec import wire_codec
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.ui")


class TopicTail:
    """Reads calmrun's topics into ``index`` and calls ``on_change`` after every applied batch.

    Args:
        settings: broker, prefix and partition count.
        index: the SQLite index to fill.
        on_change: called (no arguments) after a batch changed the index.
        refresh_s: how often the topic list is looked at for new dead-letter topics.
    """

    def __init__(
        self,
        settings: Settings,
        index: RunIndex,
        on_change: Callable[[], None] = lambda: None,
        refresh_s: float = 2.0,
    ) -> None:
        self.settings, self.index, self.on_change, self.refresh_s = settings, index, on_change, refresh_s
        self.topics = Topics(settings.kafka.prefix)
        self.codec = wire_codec(settings.wire)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._next: dict[TopicPartition, int] = {}
        self._end_at_start: dict[TopicPartition, int] = {}
        self._pending: set[TopicPartition] = set()
        self._caught_up = asyncio.Event()
        self.records = 0
        self.started_at = 0.0
        self.rebuild_s: float | None = None

    async def start(self) -> None:
        """Connect, assign every existing topic from its beginning and start following.

        Raises:
            BrokerUnavailableError: no broker answers.
        """
        k = self.settings.kafka
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            client_id=f"{k.client_id}-ui",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **client_kwargs(k),
        )
        self.started_at = time.monotonic()
        await start_client(self._consumer, k)
        await self._reassign(initial=True)
        self._task = asyncio.create_task(self._run())

    async def caught_up(self, wait_s: float = 120.0) -> None:
        """Wait until everything present at ``start()`` is in the index."""
        await asyncio.wait_for(self._caught_up.wait(), wait_s)

    async def topic_names(self) -> set[str]:
        """Every topic the broker has now (a metadata request)."""
        assert self._consumer is not None, "start() first"
        return set(await self._consumer.topics())

    @property
    def is_caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def _wanted(self, names: set[str]) -> list[str]:
        dlq = self.topics.dlq("")
        return sorted(t for t in names if t in (self.topics.state, self.topics.events) or t.startswith(dlq))

    async def _reassign(self, initial: bool = False) -> None:
        c = self._consumer
        assert c is not None
        names = self._wanted(await c.topics())
        tps = []
        for t in names:  # every calmrun topic has the configured partition count (ensure_topics enforces it)
            tps += [TopicPartition(t, p) for p in range(self.settings.kafka.partitions)]
        new = [tp for tp in tps if tp not in self._next]
        if not new and not initial:
            return
        for tp in self._next:  # where the consumer is, past any transaction marker
            self._next[tp] = await c.position(tp)
        begin = await c.beginning_offsets(new) if new else {}
        end = await c.end_offsets(new) if new else {}
        for tp in new:
            self._next[tp] = begin[tp]
            if initial:
                self._end_at_start[tp] = end[tp]
        c.assign(list(self._next))
        for tp, off in self._next.items():  # assign() forgets positions: seek every partition again
            c.seek(tp, off)
        if initial:
            self._pending = {tp for tp, end in self._end_at_start.items() if end > self._next[tp]}
            await self._check_caught_up()

    async def _check_caught_up(self) -> None:
        if self._caught_up.is_set():
            return
        assert self._consumer is not None
        for tp in list(self._pending):
            # the position, not the last record: it also moves past transaction markers
            if await self._consumer.position(tp) >= self._end_at_start[tp]:
                self._pending.discard(tp)
        if not self._pending:
            self.rebuild_s = time.monotonic() - self.started_at
            sizes = self.index.sizes()
            log.debug("index rebuilt from the topics in %.2fs: %s", self.rebuild_s, sizes)
            self._caught_up.set()

    async def _run(self) -> None:
        c = self._consumer
        assert c is not None
        last_refresh = time.monotonic()
        while True:
            batch = await c.getmany(timeout_ms=100, max_records=20_000)
            if batch:
                self._apply(batch)
                self.on_change()
            await self._check_caught_up()
            if time.monotonic() - last_refresh > self.refresh_s:
                last_refresh = time.monotonic()
                try:
                    await self._reassign()
                except CalmrunError as exc:  # the broker went away for a moment: the next look retries
                    log.warning("could not refresh the topic list: %s", exc)

    def _apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        states: list[tuple[str, RunState | None]] = []
        events: list[EventRow] = []
        dead: list[tuple[str, int, int, str, DlqRecord]] = []
        dlq_prefix = self.topics.dlq("")
        for tp, records in batch.items():
            for rec in records:
                self.records += 1
                self._next[tp] = rec.offset + 1
                if tp.topic == self.topics.state:
                    key = (rec.key or b"").decode(errors="replace")
                    if rec.value is None:
                        states.append((key, None))
                        continue
                    with contextlib.suppress(DecodeError):
                        states.append((key, self.codec.decode_as(rec.value, RunState)))
                elif tp.topic == self.topics.events:
                    if rec.value is None:
                        continue
                    with contextlib.suppress(DecodeError, KeyError):
                        events.append(event_row(self.codec, rec.value))
                elif tp.topic.startswith(dlq_prefix):
                    if rec.value is None:
                        continue
                    workflow = tp.topic[len(dlq_prefix) :]
                    dead.append((tp.topic, tp.partition, rec.offset, workflow, self._dead(rec, workflow)))
        self.index.apply(states, events, dead)

    def _dead(self, rec: Any, workflow: str) -> DlqRecord:
        try:
            return self.codec.decode_as(rec.value, DlqRecord)
        except DecodeError as exc:
            return DlqRecord(
                reason="undecodable",
                error_type="DecodeError",
                error=f"the dead-letter record itself does not decode: {exc}",
                workflow=workflow,
                source_topic=rec.topic,
                source_partition=rec.partition,
                source_offset=rec.offset,
                key=rec.key,
                value=rec.value,
                at_ms=rec.timestamp,
            )

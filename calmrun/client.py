"""The operator's side: submit runs, read state and history, tail and re-drive the dead-letter topics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.structs import TopicPartition
from pydantic import BaseModel

from calmrun.errors import (
    DecodeError,
    KafkaAuthorizationError,
    RunsNotFinishedError,
    TopicMissingError,
)
from calmrun.kafka import reader
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import Topics, check_readable, partition_for, start_client
from calmrun.settings import Settings
from calmrun.tracing.caller import caller_headers
from calmrun.wire.codec import wire_codec
from calmrun.wire.dlq import DlqRecord
from calmrun.wire.dlqview import RawEntry
from calmrun.workflow.events import RunCommand, RunEvent, RunRequest
from calmrun.workflow.state import RunState

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("calmrun.client")
TERMINAL = frozenset({"completed", "quarantined", "over_budget", "refused", "cancelled", "rejected"})


class Client:
    """A Kafka client for operators and tests; ``async with Client(settings) as c``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.kafka.prefix)
        self.codec = wire_codec(settings.wire)
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Client:
        k = self.settings.kafka
        self._producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            client_id=f"{k.client_id}-cli",
            **client_kwargs(k),
        )
        await start_client(self._producer, k)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._producer is not None:
            await self._producer.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "use Client inside 'async with'"
        return self._producer

    # -- writing ------------------------------------------------------------------------------------

    async def submit(self, request: RunRequest) -> str:
        """Produce one run request (Avro) keyed by its run ID; returns the run ID."""
        return (await self.submit_many([request]))[0]

    async def submit_many(self, requests: Iterable[RunRequest]) -> list[str]:
        """Produce many run requests and wait until all are acknowledged."""
        ids: list[str] = []
        futures = []
        caller = caller_headers()  # the caller's span, linked from the run's trace (calmrun.tracing)
        try:
            for req in requests:
                run_id = req.run_id or f"run-{time.time_ns():x}-{len(ids)}"
                req = req.model_copy(update={"run_id": run_id})
                futures.append(
                    await self.producer.send(
                        self.topics.requests,
                        self.codec.encode(req, self.topics.requests),
                        key=run_id.encode(),
                        headers=caller,
                    )
                )
                ids.append(run_id)
            await asyncio.gather(*futures)
        except TopicAuthorizationFailedError as exc:
            raise KafkaAuthorizationError("topic", self.topics.requests, detail="Write refused") from exc
        return ids

    async def command(self, cmd: RunCommand) -> None:
        """Produce one command (approve, reject, signal, cancel, redrive) keyed by its run ID."""
        try:
            await self.producer.send_and_wait(
                self.topics.requests,
                self.codec.encode(cmd, self.topics.requests),
                key=cmd.run_id.encode(),
                headers=caller_headers(),
            )
        except TopicAuthorizationFailedError as exc:
            raise KafkaAuthorizationError("topic", self.topics.requests, detail="Write refused") from exc

    async def redrive(
        self, workflow: str, run_ids: set[str] | None = None, *, by: str | None = None
    ) -> tuple[int, int]:
        """Re-drive quarantined runs (by ID, or all) and re-inject poison records of ``workflow``'s DLQ.

        ``by`` names who asked: it travels on the command (and the run's ``run.redrive_requested`` event)
        and as the header ``calmrun-redriven-by`` on a re-injected record.

        Returns:
            (runs re-driven, records re-injected). A run that is no longer quarantined ignores it. A poison
            record stored cut (``truncated``) is not re-injected: its original bytes are not all there.
        """
        runs, records, seen = 0, 0, set()
        for rec in await self.read_dlq(workflow):
            if run_ids is not None and rec.run_id not in run_ids:
                continue
            if rec.reason == "quarantined" and rec.run_id and rec.run_id not in seen:
                seen.add(rec.run_id)
                cmd = RunCommand(command="redrive", run_id=rec.run_id, workflow=workflow, by=by)
                await self.producer.send_and_wait(
                    self.topics.requests,
                    self.codec.encode(cmd, self.topics.requests),
                    key=rec.run_id.encode(),
                )
                runs += 1
            elif rec.reason == "poison" and run_ids is None and rec.truncated:
                log.warning(
                    "not re-injecting %s[%d]@%d: stored cut (%s)",
                    rec.source_topic,
                    rec.source_partition,
                    rec.source_offset,
                    ", ".join(f"{c.field} {c.size:,} B sha256 {c.sha256}" for c in rec.truncated),
                )
            elif rec.reason == "poison" and run_ids is None:
                await self.producer.send_and_wait(
                    rec.source_topic,
                    rec.value,
                    key=rec.key,
                    headers=[
                        *rec.headers.items(),
                        ("calmrun-redriven", b"1"),
                        *([("calmrun-redriven-by", by.encode())] if by else []),
                    ],
                )
                records += 1
        return runs, records

    # -- reading ------------------------------------------------------------------------------------

    async def read_states(self) -> dict[str, RunState]:
        """The latest state of every run (a full read of the compacted state topic)."""
        out: dict[str, RunState] = {}
        async for _, rec in self._read(self.topics.state, RunState):
            out[rec.run_id] = rec
        return out

    async def state(self, run_id: str) -> RunState | None:
        """One run's latest state; only its own records are decoded."""
        p = partition_for(run_id, self.settings.kafka.partitions)
        found = None
        async for _, rec in self._read(self.topics.state, RunState, partitions=[p], key=run_id.encode()):
            found = rec
        return found

    async def events(self, run_id: str | None = None, *, since_ms: int | None = None) -> list[RunEvent]:
        """The audit log of all runs, or of one run: read from its partition only, from ``since_ms``
        (record time) on, decoding only its own records.

        ``calmrun status`` passes the run's ``created_ms`` less ``_SKEW_MS``; when that finds no
        ``run.requested`` (a client clock far ahead), the run's whole partition is read instead.
        """
        if run_id is None:
            return [ev async for _, ev in self._read(self.topics.events, RunEvent)]
        parts = [partition_for(run_id, self.settings.kafka.partitions)]
        key = run_id.encode()
        found = [
            ev
            async for _, ev in self._read(
                self.topics.events, RunEvent, partitions=parts, key=key, since_ms=since_ms
            )
        ]
        if since_ms is not None and not any(e.type == "run.requested" for e in found):
            return await self.events(run_id)
        return found

    async def run_events(self, state: RunState) -> list[RunEvent]:
        """The events of the run ``state`` belongs to, read from shortly before it was requested."""
        return await self.events(state.run_id, since_ms=max(0, state.created_ms - _SKEW_MS))

    async def read_dlq(self, workflow: str) -> list[DlqRecord]:
        return [rec async for _, rec in self._read(self.topics.dlq(workflow), DlqRecord)]

    async def dlq_entries(
        self, workflow: str, *, follow: bool = False
    ) -> AsyncGenerator[DlqRecord | RawEntry]:
        """Every record of ``workflow``'s dead-letter topic; one that is not a ``DlqRecord`` comes raw."""
        async for rec in self._records(self.topics.dlq(workflow), follow=follow):
            if rec.value is None:
                continue
            try:
                yield self.codec.decode_as(rec.value, DlqRecord)
            except DecodeError as exc:
                headers = {k: v or b"" for k, v in rec.headers}
                yield RawEntry(rec.topic, rec.partition, rec.offset, rec.key, rec.value, headers, str(exc))

    async def wait_terminal(
        self, run_ids: Iterable[str], wait_s: float = 60.0, *, since_ms: int | None = None
    ) -> dict[str, RunState]:
        """Tail the state topic until every run is terminal; returns their last states.

        ``since_ms``: when the requests were sent; a ``rejected`` state of an earlier request under the
        same run ID is not their answer (a rejection takes no run ID: the next request is decided anew).

        Raises:
            RunsNotFinishedError: not all runs finished in time (it counts them by status).
        """
        wanted = set(run_ids)
        latest: dict[str, RunState] = {}
        deadline = time.monotonic() + wait_s
        async with contextlib.aclosing(
            self._read(self.topics.state, RunState, follow=True, until=deadline)
        ) as records:
            async for _, st in records:
                if st.run_id in wanted:
                    if st.status == "rejected" and since_ms is not None and st.created_ms < since_ms:
                        continue
                    latest[st.run_id] = st
                    if len(latest) == len(wanted) and all(s.status in TERMINAL for s in latest.values()):
                        return latest
        counts: dict[str, int] = {}
        for rid in wanted:
            status = latest[rid].status if rid in latest else "not started"
            counts[status] = counts.get(status, 0) + 1
        hint = (
            " (no worker has read its request yet: is one running, on this prefix? A request refused with a"
            " readable run ID ends as `rejected`; one without is parked: see `calmrun dlq tail -w _invalid`)"
            if "not started" in counts
            else ""
        )
        raise RunsNotFinishedError(len(wanted), wait_s, counts, hint)

    async def _read(
        self,
        topic: str,
        model: type[M],
        *,
        partitions: list[int] | None = None,
        follow: bool = False,
        until: float | None = None,
        key: bytes | None = None,
        since_ms: int | None = None,
    ) -> AsyncGenerator[tuple[str, M], None]:
        """Decode a topic from the beginning (or the offsets of ``since_ms``) to its end offsets (or on,
        with ``follow``); with ``key``, records of other keys are skipped before they are decoded."""
        async with contextlib.aclosing(
            self._records(
                topic, partitions=partitions, follow=follow, until=until, key=key, since_ms=since_ms
            )
        ) as records:
            async for rec in records:
                if rec.value is None:
                    continue
                yield (rec.key or b"").decode(errors="replace"), self.codec.decode_as(rec.value, model)

    async def _records(
        self,
        topic: str,
        *,
        partitions: list[int] | None = None,
        follow: bool = False,
        until: float | None = None,
        key: bytes | None = None,
        since_ms: int | None = None,
    ) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
        """A topic's records from the beginning (or ``since_ms``) to its end offsets (or on, with
        ``follow``), undecoded; with ``key``, only that key's."""
        # "earliest": the default "latest" reset that assign() starts can race our seek and skip records
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # the worker writes in transactions
            **client_kwargs(self.settings.kafka),
        )
        await start_client(consumer, self.settings.kafka)
        try:
            # every calmrun topic has the configured partition count (ensure_topics enforces it)
            known = range(self.settings.kafka.partitions) if topic in await consumer.topics() else None
            if not known:
                missing = TopicMissingError(topic)
                await check_readable(self.settings.kafka, topic, missing)
            tps = [TopicPartition(topic, p) for p in sorted(partitions if partitions is not None else known)]
            if follow:
                consumer.assign(tps)
                start = await consumer.beginning_offsets(tps)
                records = reader.follow(consumer, tps, start, until=until)
            else:
                records = reader.read_to_end(consumer, tps, since_ms)
            async with contextlib.aclosing(records) as each:
                async for rec in each:
                    if key is None or rec.key == key:
                        yield rec
        finally:
            await consumer.stop()


_SKEW_MS = 5 * 60_000
"""How far a client's clock (a request's timestamp: a run's ``created_ms``) may be ahead of the worker's."""


def summarize(states: dict[str, RunState]) -> dict[str, Any]:
    """Counts by status and outcome, for CLI output and tests."""
    out: dict[str, Any] = {"runs": len(states), "by_status": {}, "by_outcome": {}}
    for s in states.values():
        out["by_status"][s.status] = out["by_status"].get(s.status, 0) + 1
        if s.outcome:
            out["by_outcome"][s.outcome] = out["by_outcome"].get(s.outcome, 0) + 1
    return out

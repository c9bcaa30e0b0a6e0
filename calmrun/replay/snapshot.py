"""A run's snapshot: its latest state and its event history as recorded in Kafka, exportable as JSON.

Workflow definitions are not stored in Kafka, so a snapshot holds what the runtime recorded and nothing
else; the definition to replay against is given separately (a YAML file). A snapshot read from a file
needs no broker for recorded replay.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calmrun.errors import ConfigError, SnapshotError
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics, check_readable, partition_for, start_client
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.wire.codec import wire_codec
from calmrun.workflow.events import HELD_NOTES, RunEvent
from calmrun.workflow.state import RunState

FORMAT: Literal["calmrun.snapshot/1"] = "calmrun.snapshot/1"


class Snapshot(BaseModel):
    """One run as recorded: the latest state from ``runs.state`` and its events from ``runs.events``.

    ``events`` are the applied events (``seq >= 0``) in seq order, each once: copies re-sent after a crash
    (same seq) and ``input.ignored`` lines (seq -1, never applied) are dropped when the snapshot is made.
    ``notes`` are the commands held for the run and released (``input.held``, ``input.released``: seq -1,
    in the order logged), which change only ``RunState.held``; recorded replay puts them back.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["calmrun.snapshot/1"] = FORMAT
    run_id: str
    prefix: str = Field("", description="topic prefix the run was read from")
    state: RunState | None = None
    events: list[RunEvent] = Field(default_factory=list)
    notes: list[RunEvent] = Field(default_factory=list)

    @property
    def workflow(self) -> str:
        if self.state is not None:
            return self.state.workflow
        return self.events[0].workflow if self.events else ""

    @property
    def version(self) -> str:
        if self.state is not None:
            return self.state.version
        return self.events[0].version if self.events else ""

    @property
    def requested_ms(self) -> int:
        """When the run was requested (its first event), 0 when no event is recorded."""
        return self.events[0].at_ms if self.events else 0

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)


def applied_events(events: Iterable[RunEvent]) -> list[RunEvent]:
    """The applied events of one run in seq order, each seq once (the first copy wins)."""
    by_seq: dict[int, RunEvent] = {}
    for e in events:
        if e.seq >= 0 and e.seq not in by_seq:
            by_seq[e.seq] = e
    return [by_seq[s] for s in sorted(by_seq)]


def load_snapshot(path: Path) -> Snapshot:
    """Read a snapshot file written by ``calmrun snapshot``.

    Raises:
        SnapshotError: the file is missing, not JSON, or not a calmrun snapshot.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise SnapshotError(f"{path}: {exc}") from exc
    try:
        return Snapshot.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise SnapshotError(f"{path}: not a calmrun snapshot ({where}: {first['msg']})") from exc


async def fetch_snapshot(settings: Settings, run_id: str) -> Snapshot:
    """Read one run's state and events (only its own partition of each topic).

    Raises:
        SnapshotError: no event of ``run_id`` is recorded under the prefix.
        BrokerUnavailableError: the broker does not answer.
    """
    snaps = await scan_runs(
        settings,
        partitions=[partition_for(run_id, settings.kafka.partitions)],
        keep=lambda rid: rid == run_id,
    )
    snap = snaps.get(run_id)
    if snap is None or not snap.events:
        raise SnapshotError(
            f"no run {run_id!r} is recorded in {Topics(settings.kafka.prefix).events}", run_id=run_id
        )
    return snap


async def fetch_snapshots(
    settings: Settings,
    *,
    workflow: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[Snapshot]:
    """Every run of ``workflow`` requested in ``[since_ms, until_ms)``, in request order.

    The events topic is read from the offsets of ``since_ms`` on (a run's events are never older than its
    request), the state topic whole.
    """
    snaps = await scan_runs(settings, since_ms=since_ms, on_progress=on_progress)
    out = []
    for snap in snaps.values():
        if not snap.events or snap.events[0].type != "run.requested":
            continue  # its request is older than since_ms: only part of its history was read
        if workflow is not None and snap.workflow != workflow:
            continue
        at = snap.requested_ms
        if (since_ms is not None and at < since_ms) or (until_ms is not None and at >= until_ms):
            continue
        out.append(snap)
    return sorted(out, key=lambda s: (s.requested_ms, s.run_id))


async def scan_runs(
    settings: Settings,
    *,
    partitions: list[int] | None = None,
    keep: Callable[[str], bool] | None = None,
    since_ms: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Snapshot]:
    k = settings.kafka
    topics = Topics(k.prefix)
    codec = wire_codec(settings.wire)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        client_id=f"{k.client_id}-replay",
        **client_kwargs(k),
    )
    await start_client(consumer, k)
    try:
        existing = await consumer.topics()
        for t in (topics.events, topics.state):
            if t not in existing:
                missing = ConfigError(f"topic {t} does not exist: is the prefix {k.prefix!r} right?")
                await check_readable(k, t, missing)
        parts = partitions if partitions is not None else list(range(k.partitions))
        events: dict[str, list[RunEvent]] = {}
        notes: dict[str, list[RunEvent]] = {}
        states: dict[str, RunState] = {}
        # the state first: its state is never newer than the events read after it
        state_tps = [TopicPartition(topics.state, p) for p in parts]
        async for rec in read_to_end(consumer, state_tps, None):
            rid = (rec.key or b"").decode(errors="replace")
            if keep is not None and not keep(rid):
                continue
            if rec.value is None:
                states.pop(rid, None)
            else:
                states[rid] = codec.decode_as(rec.value, RunState)
        event_tps = [TopicPartition(topics.events, p) for p in parts]
        n = 0
        async for rec in read_to_end(consumer, event_tps, since_ms):
            n += 1
            if on_progress is not None and n % 5000 == 0:
                on_progress(n)
            rid = (rec.key or b"").decode(errors="replace")
            if rec.value is None or (keep is not None and not keep(rid)):
                continue
            ev = codec.decode_as(rec.value, RunEvent)
            if ev.seq >= 0:
                events.setdefault(rid, []).append(ev)
            elif ev.type in HELD_NOTES:
                notes.setdefault(rid, []).append(ev)
        if on_progress is not None:
            on_progress(n)
        redactor = Redactor(settings.redact)  # the events are redacted on the topic; the state is not
        return {
            rid: Snapshot(
                run_id=rid,
                prefix=k.prefix,
                state=redactor.state(states[rid]) if rid in states else None,
                events=applied_events(evs),
                notes=notes.get(rid, []),
            )
            for rid, evs in events.items()
        }
    finally:
        await consumer.stop()

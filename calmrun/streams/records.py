"""The records a worker writes, built from decisions: pure functions, no I/O, and the header names.

Every record of a run goes to the run's partition of its topic (co-partitioned by run ID), so one
partition's transaction holds everything a decision wrote.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from calmrun.kafka.topics import Topics
from calmrun.wire.codec import RecordCodec
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.events import RunEvent, StepTask

IDEMPOTENCY_KEY = "calmrun-idempotency-key"
"""Header of a task record: the attempt's idempotency key (``StepTask.idempotency_key``)."""
MOVED_FROM = "calmrun-moved-from"
"""Header of a request re-keyed to its run's partition: ``<partition>:<offset>`` of the original."""
EVENT_TYPE = "type"
"""Header of an event record: its ``RunEvent.type``, so readers can filter without decoding."""


@dataclass(frozen=True)
class Out:
    """One record to send to an explicit partition.

    A task record that is not sent (its step runs here: ``streams.local.Recording``) is left unencoded:
    ``value`` None and ``encode`` what makes its bytes, which only a dead letter of its attempt reads.
    """

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    encode: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)

    def value_or_encode(self) -> bytes | Callable[[], bytes]:
        """``value``, or what encodes it when it was left unencoded (a ``LocalSource`` reads it on demand)."""
        if self.value is None and self.encode is not None:
            return self.encode
        return self.value or b""


@dataclass(frozen=True)
class StateOut:
    """A run's state record, encoded only if it is sent (a later state in the same batch replaces it)."""

    topic: str
    partition: int
    key: bytes
    encode: Callable[[], bytes]


def event_out(topics: Topics, codec: RecordCodec, p: int, ev: RunEvent) -> Out:
    return Out(
        topics.events,
        p,
        ev.run_id.encode(),
        codec.encode(ev, topics.events),
        ((EVENT_TYPE, ev.type.encode()),),
    )


def task_out(
    topics: Topics,
    codec: RecordCodec,
    p: int,
    task: StepTask,
    headers: tuple[tuple[str, bytes], ...] = (),
    *,
    unsent: Collection[str] = (),
) -> Out:
    """A task record; ``headers`` are added (a ``traceparent`` when tracing is on: ``calmrun.tracing``).
    One on an ``unsent`` step topic (a step this worker runs itself, with no task record) is encoded only
    if read."""
    topic = topics.step(task.workflow, task.step)
    encode = functools.partial(codec.encode, task, topic)
    sent = topic not in unsent
    return Out(
        topic,
        p,
        task.run_id.encode(),
        encode() if sent else None,
        ((IDEMPOTENCY_KEY, task.idempotency_key.encode()), *headers),
        None if sent else encode,
    )


def dlq_out(topic: str, codec: RecordCodec, p: int, key: bytes | None, dlq: DlqRecord) -> Out:
    headers = (
        ("error", dlq.error_type.encode()),
        ("reason", dlq.reason.encode()),
        ("source", f"{dlq.source_topic}[{dlq.source_partition}]@{dlq.source_offset}".encode()),
    )
    return Out(topic, p, key, codec.encode(dlq), headers)


def header(headers: object, name: str) -> bytes | None:
    """The value of header ``name`` of a consumed record (a sequence of (name, bytes) pairs), or None."""
    for k, v in headers:  # type: ignore[attr-defined]
        if k == name:
            return bytes(v)
    return None

"""A task with no record (its step runs here) is encoded only if a dead letter reads it, to the same bytes."""

from __future__ import annotations

from pydantic import BaseModel

from calmrun.kafka.topics import Topics
from calmrun.streams.records import task_out
from calmrun.streams.tasks import LocalSource
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import StepTask

TASK = StepTask(
    run_id="r1", workflow="lin", version="1", step="s1", attempt=2, agent="a", issued_ms=5, timeout_s=3.0
)


def test_an_unsent_task_is_encoded_only_when_read_and_to_the_bytes_a_sent_one_has() -> None:
    topics, codec = Topics("t"), RecordCodec(wire_models())
    sent = task_out(topics, codec, 1, TASK)
    encodes: list[int] = []

    class Counting(RecordCodec):
        def encode(self, record: BaseModel, topic: str | None = None) -> bytes:
            encodes.append(1)
            return super().encode(record, topic)

    unsent = task_out(topics, Counting(wire_models()), 1, TASK, unsent={topics.step("lin", "s1")})
    assert sent.value is not None and unsent.value is None and not encodes
    assert (unsent.topic, unsent.partition, unsent.key, unsent.headers) == (
        sent.topic,
        sent.partition,
        sent.key,
        sent.headers,
    )
    source = LocalSource(unsent.topic, 1, unsent.key or b"", unsent.value_or_encode(), unsent.headers)
    assert not encodes
    assert source.value == sent.value and source.value == sent.value
    assert len(encodes) == 1  # once, then kept
    assert LocalSource(sent.topic, 1, b"", sent.value_or_encode(), ()).value == sent.value


def test_a_task_on_another_topic_is_sent() -> None:
    topics, codec = Topics("t"), RecordCodec(wire_models())
    out = task_out(topics, codec, 0, TASK, unsent={topics.step("lin", "s2")})
    assert out.value == task_out(topics, codec, 0, TASK).value and out.encode is None

"""The worker's intake against the real broker: any exception on one record parks it; a storm stops it.

``Worker._isolated`` is the one place where a record's handling may fail; these tests hand it real records
read from Kafka and handlers that fail the way a bug of ours would.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry, StepContext
from calmrun.client import Client
from calmrun.errors import PoisonStormError
from calmrun.kafka.topics import INVALID, Topics
from calmrun.settings import Settings
from calmrun.streams.checkpoint import Checkpoint, Pending
from calmrun.streams.fetch import getmany
from calmrun.workflow.events import RunCommand, RunRequest
from tests.runtime_support import (
    Item,
    Out,
    add_one,
    linear,
    poll_states,
    read_raw,
    ready,
    running,
    settings_for,
    until,
)


def _with_limits(broker: str, prefix: str, **limits: int) -> Settings:
    s = settings_for(broker, prefix)
    return s.model_copy(update={"limits": s.limits.model_copy(update=limits)})


def _failing(exc: Exception) -> Callable[[ConsumerRecord[bytes, bytes], Pending], None]:
    def handle(rec: ConsumerRecord[bytes, bytes], pending: Pending) -> None:
        raise exc

    return handle


async def test_unexpected_errors_park_the_record_and_only_a_storm_stops_the_worker(
    broker: str, prefix: str
) -> None:
    settings = settings_for(broker, prefix)
    settings = settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"max_consecutive_poison": 3})}
    )
    topics = Topics(prefix)
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        await producer.start()
        try:
            for i in range(6):
                await producer.send_and_wait(topics.events, f"r{i}".encode(), key=b"k", partition=0)
        finally:
            await producer.stop()
        recs = await read_raw(broker, topics.events)
        tp = TopicPartition(topics.events, 0)
        inputs = Checkpoint()  # the records are this test's, not the worker's inputs
        w.intake.isolated(_failing(KeyError("a bug")), recs[0], inputs.consumed(tp, 0))
        w.intake.isolated(_failing(RecursionError("deep")), recs[1], inputs.consumed(tp, 1))
        w.intake.isolated(
            _ok, recs[2], inputs.consumed(tp, 2)
        )  # a record handled fine in between resets the count
        w.intake.isolated(_failing(ValueError("x")), recs[3], inputs.consumed(tp, 3))
        w.intake.isolated(_failing(ValueError("y")), recs[4], inputs.consumed(tp, 4))
        assert w.failure is None
        w.intake.isolated(_failing(TypeError("z")), recs[5], inputs.consumed(tp, 5))
        assert isinstance(w.failure, PoisonStormError)
        assert "3 consecutive records" in str(w.failure) and "bug" in str(w.failure)
        await until(lambda: w.readout.uncommitted == 0, 10, "dead letters committed")
    async with Client(settings) as client:
        parked = await client.read_dlq(INVALID)
    assert [d.error_type for d in sorted(parked, key=lambda d: d.source_offset)] == [
        "KeyError",
        "RecursionError",
        "ValueError",
        "ValueError",
        "TypeError",
    ]
    assert all(d.source_topic == topics.events and d.traceback for d in parked)


def _ok(rec: ConsumerRecord[bytes, bytes], pending: Pending) -> None:
    pass  # handled: no decision, nothing parked


async def test_a_redrive_past_max_attempts_per_run_is_refused(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    settings = settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"max_attempts_per_run": 4})}
    )

    async def boom(ctx: StepContext, item: Item) -> Out:
        raise RuntimeError("down")

    fast = {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02, "jitter": 0.0}
    wf = linear("boom", steps=1, agent="boom", retry=fast)
    async with running(settings, [wf], AgentRegistry({"boom": boom})) as w, Client(settings) as client:
        await ready(w)
        [rid] = await client.submit_many([RunRequest(workflow="boom", input={"n": 1}, run_id="b1")])
        await poll_states(client, [rid], lambda s: s.status == "quarantined", 60, "quarantined")
        await client.redrive("boom")  # attempts 2 < 4: it runs two more, and is quarantined again
        await poll_states(
            client,
            [rid],
            lambda s: s.status == "quarantined" and s.steps["s1"].attempt == 4,
            60,
            "4 attempts",
        )
        cmd = RunCommand(command="redrive", run_id=rid, workflow="boom")
        await client.producer.send_and_wait(
            client.topics.requests, client.codec.encode(cmd), key=rid.encode()
        )
        await until(lambda: w.stats.poison == 1, 30, "the redrive to be refused")
        refused = [d for d in await client.read_dlq("boom") if d.reason == "poison"]
        state = await client.state(rid)
    assert [d.error_type for d in refused] == ["LimitExceededError"]
    assert "max_attempts_per_run: 5 > 4" in refused[0].error
    assert state is not None and state.steps["s1"].attempt == 4


async def test_fetch_steps_past_records_the_client_cannot_parse_and_loses_none_before_them(
    broker: str, prefix: str
) -> None:
    """A non-UTF-8 header name (kcat writes one) makes aiokafka's getmany raise; nothing may be lost."""
    kcat = shutil.which("kcat")
    assert kcat is not None, "the kcat CLI is not installed (Debian package 'kcat'); this test needs it"
    topic = f"{prefix}.h"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=50)
    await producer.start()
    try:
        for i in range(5):  # one batch: these come in the same fetch as the bad records
            await producer.send(topic, f"a{i}".encode(), partition=0)
            await producer.send(topic, f"p1-{i}".encode(), partition=1)
        await producer.flush()
        for name in (b"\xff\xfe", b"\xc3"):  # two in a row
            _kcat_bad_header(kcat, broker, topic, name)
        for i in range(5):
            await producer.send(topic, f"b{i}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker, auto_offset_reset="earliest", group_id=prefix
    )
    await consumer.start()
    seen: list[tuple[int, int, bytes | None]] = []
    bad: list[tuple[int, int]] = []
    nxt: dict[TopicPartition, int] = {}
    try:
        for _ in range(50):
            f = await getmany(consumer, timeout_ms=300, max_records=500, consumed_to=nxt.get)
            for tp, recs in f.records.items():
                seen += [(tp.partition, r.offset, r.value) for r in recs]
                nxt[tp] = recs[-1].offset + 1
            for tp, off, exc in f.unreadable:
                assert isinstance(exc, UnicodeDecodeError)
                bad.append((tp.partition, off))
                nxt[tp] = off + 1
            if len(seen) >= 15 and len(bad) >= 2:
                break
    finally:
        await consumer.stop()
    assert bad == [(0, 5), (0, 6)]
    assert sorted(seen) == sorted(
        [(0, i, f"a{i}".encode()) for i in range(5)]
        + [(0, 7 + i, f"b{i}".encode()) for i in range(5)]
        + [(1, i, f"p1-{i}".encode()) for i in range(5)]
    )


def _kcat_bad_header(kcat: str, broker: str, topic: str, name: bytes) -> None:
    cmd = [kcat.encode(), b"-P", b"-b", broker.encode(), b"-t", topic.encode(), b"-p", b"0"]
    subprocess.run([*cmd, b"-H", name + b"=v"], input=b"bad\n", check=True, timeout=60)

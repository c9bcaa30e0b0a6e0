"""Eager tasks and coalesced states against the real broker.

A worker starts the tasks it schedules at once (``worker.eager``) and writes a run's state once for a
burst of its decisions (``streams.publisher``); neither may change what a run records or lose a commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.streams.publisher import LazyOut, Out, Publisher
from calmrun.streams.topics import Topics
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, read_raw, ready, running, settings_for, until

N = 30


async def committed_lag(broker: str, group: str, topics: list[str], partitions: int = 4) -> int:
    """Records of ``topics`` past the group's committed offsets (0: everything read was committed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        end = await consumer.end_offsets(tps)
        lag = 0
        for tp in tps:
            lag += end[tp] - ((await consumer.committed(tp)) or 0)
        return lag
    finally:
        await consumer.stop()


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "read-back"])
async def test_eager_and_read_back_tasks_record_the_same_runs(broker: str, prefix: str, eager: bool) -> None:
    settings = settings_for(broker, prefix, eager=eager)
    wf = linear()
    async with running(settings, [wf], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"r{i}") for i in range(N)
            )
            states = await client.wait_terminal(ids, wait_s=60)
            if eager:  # each task record is still read back, and recognised
                await until(lambda: w.stats.tasks_echoed >= 3 * N, 30, "the echoes of the eager tasks")
            events = await client.events()
        stats = w.stats
    for i in range(N):
        assert states[f"r{i}"].status == "completed"
        assert states[f"r{i}"].steps["s3"].output == {"n": i + 3, "label": "s3:1"}
        mine = [e for e in events if e.run_id == f"r{i}"]
        assert [(e.seq, e.type, e.step) for e in mine] == [
            (1, "run.requested", None),
            (2, "step.scheduled", "s1"),
            (3, "step.succeeded", "s1"),
            (4, "run.routed", "s1"),
            (5, "step.scheduled", "s2"),
            (6, "step.succeeded", "s2"),
            (7, "run.routed", "s2"),
            (8, "step.scheduled", "s3"),
            (9, "step.succeeded", "s3"),
            (10, "run.routed", "s3"),
            (11, "run.completed", None),
        ], mine
    assert (stats.tasks_started, stats.tasks_skipped) == (3 * N, 0)
    assert (stats.tasks_eager, stats.tasks_echoed) == ((3 * N, 3 * N) if eager else (0, 0))
    # the worker stopped cleanly: every record it read is committed, the echoes included
    t = Topics(prefix)
    assert await committed_lag(broker, settings.group_id, [t.requests, *t.step_topics([wf])]) == 0


async def _publisher(broker: str, *topics: str) -> tuple[AIOKafkaProducer, Publisher, list[BaseException]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics])
    finally:
        await admin.close()
    errors: list[BaseException] = []
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", enable_idempotence=True)
    await producer.start()
    pub = Publisher(producer, errors.append)
    pub.start()
    return producer, pub, errors


async def test_a_burst_of_decisions_writes_the_run_state_once_and_finishes_every_input(
    broker: str, prefix: str
) -> None:
    """Ten decisions of one run submitted together: their events in order, one state (the last), ten done."""
    topic_ev, topic_st = f"{prefix}.ev", f"{prefix}.st"
    producer, pub, errors = await _publisher(broker, topic_ev, topic_st)
    done: list[int] = []
    encoded: list[int] = []

    def state(i: int) -> LazyOut:
        def encode() -> bytes:
            encoded.append(i)
            return f"state{i}".encode()

        return LazyOut(topic_st, 0, b"run", encode)

    def finisher(i: int) -> Callable[[], None]:
        return lambda: done.append(i)

    try:
        for i in range(10):
            pub.submit([Out(topic_ev, 0, b"run", f"event{i}".encode())], state(i), finisher(i))
        await asyncio.wait_for(pub.drain(), 30)
    finally:
        await pub.stop()
        await producer.stop()
    assert errors == []
    assert [r.value for r in await read_raw(broker, topic_ev, 1)] == [f"event{i}".encode() for i in range(10)]
    assert [r.value for r in await read_raw(broker, topic_st, 1)] == [b"state9"]
    assert encoded == [9]  # superseded states are never even encoded
    assert sorted(done) == list(range(10))


async def test_a_run_deciding_without_pause_still_gets_its_state_written(broker: str, prefix: str) -> None:
    """The absorbing is bounded: 300 queued decisions of one run write a few states, the last one last."""
    topic_ev, topic_st = f"{prefix}.ev", f"{prefix}.st"
    producer, pub, errors = await _publisher(broker, topic_ev, topic_st)
    done: list[int] = []
    try:
        for i in range(300):
            pub.submit(
                [Out(topic_ev, 0, b"run", b"e")],
                LazyOut(topic_st, 0, b"run", lambda i=i: str(i).encode()),  # type: ignore[misc]
                lambda i=i: done.append(i),  # type: ignore[misc]
            )
        await asyncio.wait_for(pub.drain(), 30)
    finally:
        await pub.stop()
        await producer.stop()
    assert errors == []
    states = [int(r.value) for r in await read_raw(broker, topic_st, 1)]
    assert 2 <= len(states) <= 300 // 64 + 1, states
    assert states == sorted(states) and states[-1] == 299
    assert sorted(done) == list(range(300))


async def test_a_flood_of_requests_is_held_back_by_unacknowledged_decisions(broker: str, prefix: str) -> None:
    """Eager no-op steps decide faster than the producer sends: the worker stops fetching meanwhile."""
    settings = settings_for(broker, prefix, max_unacked=50)
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"f{i}") for i in range(3000)
            )
            states = await client.wait_terminal(ids, wait_s=120)
        peak = w.stats.peak_unacked
    assert {s.status for s in states.values()} == {"completed"}
    # past the last check of room: one fetch (up to 500 requests, 4 decisions each) and the tasks already
    # running (up to max_in_flight 100, 3 decisions each); without backpressure all 12,000 were pending
    assert 50 <= peak <= 50 + 4 * 500 + 3 * 100, peak

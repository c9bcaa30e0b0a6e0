"""Eager tasks and coalesced states against the real broker.

A worker starts the tasks it schedules at once (``worker.eager``) and writes a run's state once for a
burst of its decisions (``streams.txn``); neither may change what a run records or lose a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.gate import Gate
from calmrun.streams.records import Out, StateOut
from calmrun.streams.txn import TxnWriter
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, ready, running, settings_for, until

N = 30


async def committed_lag(broker: str, group: str, topics: list[str], partitions: int = 4) -> int:
    """Records of ``topics`` at or past the group's committed offsets (0: everything read was committed).

    Counted as records, not offsets: transactions leave commit markers, which occupy offsets but are no
    records a consumer could be given again.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, group_id=group, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        end = await consumer.end_offsets(tps)
        lag = 0
        for tp in tps:
            start = (await consumer.committed(tp)) or 0
            if start < end[tp]:
                consumer.assign([tp])
                consumer.seek(tp, start)
                while await consumer.position(tp) < end[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=200)
                    lag += sum(1 for r in batch.get(tp, []) if r.offset < end[tp])
        return lag
    finally:
        await consumer.stop()


MODES = {  # worker settings: eager without task records (auto, the default, alone in its group; off),
    # eager with them, read back
    "eager": {},
    "eager-off": {"task_records": False},
    "eager-records": {"task_records": True},
    "read-back": {"eager": False},
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_eager_and_read_back_tasks_record_the_same_runs(broker: str, prefix: str, mode: str) -> None:
    settings = settings_for(broker, prefix, **MODES[mode])
    eager, records = settings.worker.eager, settings.worker.task_records is True or not settings.worker.eager
    wf = linear()
    async with running(settings, [wf], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"r{i}") for i in range(N)
            )
            states = await client.wait_terminal(ids, wait_s=60)
            if eager and records:  # each eager task's record is still read back, and recognised
                await until(
                    lambda: w.stats.tasks_echoed == w.stats.tasks_eager, 30, "the echoes of the eager tasks"
                )
            events = await client.events()
        stats = w.stats
        noted_first = w.attempts.noted_first
    assert noted_first == 0  # every attempt noted as a first run ran as one (none left to misread later)
    for i in range(N):
        assert states[f"r{i}"].status == "completed"
        assert states[f"r{i}"].steps["s3"].output == {"n": i + 3, "label": "s3:1"}
        mine = [e for e in events if e.run_id == f"r{i}"]
        assert [(e.seq, e.type, e.step) for e in mine] == [
            (1, "run.requested", None),
            (2, "step.scheduled", "s1"),
            (3, "step.succeeded", "s1"),
            (4, "step.scheduled", "s2"),
            (5, "step.succeeded", "s2"),
            (6, "step.scheduled", "s3"),
            (7, "step.succeeded", "s3"),
            (8, "run.completed", None),
        ], mine
    assert (stats.tasks_started, stats.tasks_skipped, stats.tasks_resumed) == (3 * N, 0, 0)
    # Eager: a task starts once its decision commits, unless the reader is quicker than the commit's callback
    # on a busy machine and starts it from its record (then it is no echo); each attempt runs once either way.
    assert stats.tasks_echoed == (stats.tasks_eager if records else 0)
    if not eager:
        assert stats.tasks_eager == 0
    elif records:
        assert stats.tasks_eager >= N
    else:  # no record to be read back: every attempt starts eagerly
        assert stats.tasks_eager == 3 * N
    assert stats.decisions_early == (N if eager else 0)  # s1 of each run: decided from its request
    # the worker stopped cleanly: every record it read is committed, the echoes included
    t = Topics(prefix)
    assert await committed_lag(broker, settings.group_id, [t.requests, *t.step_topics([wf])]) == 0
    # a task record for each attempt, or none at all (the steps run here: worker.task_records)
    assert await task_records(broker, t.step_topics([wf])) == (3 * N if records else 0)


async def task_records(broker: str, topics: list[str], partitions: int = 4) -> int:
    """Committed records on ``topics`` (read_committed, from the beginning)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for topic in topics for p in range(partitions)]
        return sum([1 async for _ in read_to_end(consumer, tps)])
    finally:
        await consumer.stop()


class _Recorded(Checkpoint):
    """A checkpoint that keeps every commit of input positions, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[dict[TopicPartition, int]] = []

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        super().committed(positions)
        self.log.append(dict(positions))


class Lost:
    """The writer's ``Losses`` port: what failed, in order."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures

    def lost(self, parts: set[int], exc: BaseException) -> None:
        self.failures.append(exc)


async def _writer(
    broker: str,
    tid: str,
    failures: list[BaseException],
    *topics: str,
    checkpoint: Checkpoint | None = None,
    gate: Gate | None = None,
    linger_s: float = 0.0,
    max_request_size: int = 1_048_576,
    lanes: int = 1,
    ahead_s: float = 0.0,
) -> TxnWriter:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics])
    finally:
        await admin.close()
    producer, *spare = (
        AIOKafkaProducer(bootstrap_servers=broker, transactional_id=t, enable_idempotence=True)
        for t in (tid, f"{tid}.b")[:lanes]
    )  # only the producers the writer starts (one never started warns as it is collected)
    writer = TxnWriter(
        "0",
        producer,
        f"{tid}-group",
        checkpoint or Checkpoint(),  # no inputs unless given: nothing to commit but the records
        gate or Gate(100),
        Lost(failures),
        {0},
        linger_s=linger_s,
        linger_from=8,
        max_request_size=max_request_size,
        spare=spare[0] if spare else None,
        ahead_s=ahead_s,
    )
    await writer.start()
    return writer


async def read_committed(broker: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        return [r.value async for r in read_to_end(consumer, [TopicPartition(topic, 0)])]
    finally:
        await consumer.stop()


async def test_a_burst_of_decisions_is_one_transaction_with_the_run_state_once(
    broker: str, prefix: str
) -> None:
    """Ten decisions of one run added together: their events in order, one state (the last), ten commits."""
    topic_ev, topic_st = f"{prefix}.ev", f"{prefix}.st"
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic_ev, topic_st)
    done: list[int] = []
    encoded: list[int] = []

    def state(i: int) -> StateOut:
        def encode() -> bytes:
            encoded.append(i)
            return f"state{i}".encode()

        return StateOut(topic_st, 0, b"run", encode)

    try:
        for i in range(10):
            writer.add(
                0,
                [Out(topic_ev, 0, b"run", f"event{i}".encode())],
                state(i),
                functools.partial(done.append, i),
                inputs=(),
            )
        await asyncio.wait_for(writer.flush(), 30)
    finally:
        await writer.close()
    assert failures == []
    assert writer.commits == 1
    assert await read_committed(broker, topic_ev) == [f"event{i}".encode() for i in range(10)]
    assert await read_committed(broker, topic_st) == [b"state9"]
    assert encoded == [9]  # superseded states are never even encoded
    assert done == list(range(10))  # after the commit, in decision order


async def test_task_record_offsets_wait_for_the_next_transaction_and_every_flush(
    broker: str, prefix: str
) -> None:
    """A batch whose moved input offsets are all lazy (task records') commits without them (two requests
    fewer); they go with the next batch that has a strict input's offset, or the first after a kick, and a
    flush never leaves them behind."""
    topic_ev, steps, requests = f"{prefix}.ev", f"{prefix}.step", f"{prefix}.req"
    failures: list[BaseException] = []
    step_tp, request_tp = TopicPartition(steps, 0), TopicPartition(requests, 0)
    checkpoint = _Recorded()
    writer = await _writer(
        broker,
        f"{prefix}.tx",
        failures,
        topic_ev,
        steps,
        requests,
        checkpoint=checkpoint,
    )

    async def decide(name: str, tp: TopicPartition, offset: int) -> None:
        decided = asyncio.Event()
        answered = [checkpoint.consumed(tp, offset)]
        lazy = tp == step_tp  # a task record: re-read after its attempt is decided, it is stale
        writer.add(
            0, [Out(topic_ev, 0, b"run", name.encode())], None, decided.set, inputs=answered, lazy=lazy
        )
        await asyncio.wait_for(decided.wait(), 30)

    try:
        await decide("a local result", step_tp, 4)  # only a task record's offset moved: it waits
        assert checkpoint.log == []
        await decide("a request", request_tp, 2)  # a request's offset goes with its decision: the other too
        assert checkpoint.log == [{step_tp: 5, request_tp: 3}]
        await decide("another local result", step_tp, 8)
        assert checkpoint.log == [{step_tp: 5, request_tp: 3}]
        writer.kick()  # the commit loop: the next transaction commits them, even a busy writer's
        await decide("a third local result", step_tp, 9)
        assert checkpoint.log == [{step_tp: 5, request_tp: 3}, {step_tp: 10}]
        await decide("a fourth local result", step_tp, 10)
        await asyncio.wait_for(writer.flush(), 30)  # a flush (revoked, stopping) commits it
        assert checkpoint.log == [{step_tp: 5, request_tp: 3}, {step_tp: 10}, {step_tp: 11}]
    finally:
        await writer.close()
    assert failures == []
    events = [b"a local result", b"a request", b"another local result", b"a third local result"]
    events.append(b"a fourth local result")
    assert await read_committed(broker, topic_ev) == events


async def test_after_a_large_batch_the_writer_lingers_and_the_next_decisions_share_one_transaction(
    broker: str, prefix: str
) -> None:
    """worker.busy_linger_ms: decisions added one by one while the writer lingers after a batch of 8 or more
    commit together, in order, each once."""
    topic_ev = f"{prefix}.ev"
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic_ev, linger_s=3.0)
    done: list[int] = []
    try:
        for i in range(8):
            writer.add(
                0,
                [Out(topic_ev, 0, b"run", f"e{i}".encode())],
                None,
                functools.partial(done.append, i),
                inputs=(),
            )
        await until(lambda: writer.commits == 1, 30)
        for i in range(8, 13):  # the writer lingers: without it, each could be a transaction of its own
            writer.add(
                0,
                [Out(topic_ev, 0, b"run", f"e{i}".encode())],
                None,
                functools.partial(done.append, i),
                inputs=(),
            )
            await asyncio.sleep(0.02)
        await asyncio.wait_for(writer.flush(), 60)
    finally:
        await writer.close()
    assert failures == []
    assert writer.commits == 2
    assert await read_committed(broker, topic_ev) == [f"e{i}".encode() for i in range(13)]
    assert done == list(range(13))


async def test_a_flood_of_requests_is_held_back_by_unacknowledged_decisions(broker: str, prefix: str) -> None:
    """Eager no-op steps decide faster than the producer sends: the worker stops fetching meanwhile."""
    settings = settings_for(broker, prefix, max_unacked=50)
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"f{i}") for i in range(3000)
            )
            states = await client.wait_terminal(ids, wait_s=240)
        peak = w.stats.peak_unacked
    assert {s.status for s in states.values()} == {"completed"}
    # past the last check of room: one fetch (up to 500 requests, 4 decisions each) and the tasks already
    # running (up to max_in_flight 100, 3 decisions each); without backpressure all 12,000 were pending
    assert 50 <= peak <= 50 + 4 * 500 + 3 * 100, peak

"""A writer's two lanes (``streams.txn``: two transactional ids per partition, written in turn, the next
transaction begun ahead), against the real broker: every decision once and in order, input offsets only
on the first lane and never going back, both of a fenced writer's lanes fenced, and no transaction begun
ahead left open."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from calmrun.streams.gate import Gate
from calmrun.streams.records import Out
from calmrun.streams.txn import TxnWriter, transactional_id
from calmrun.streams.txnstate import FENCED
from tests.runtime_support import until
from tests.streams.test_runtime_eager import _Recorded, _writer, read_committed


async def _decide(writer: TxnWriter, topic: str, value: bytes, **kw: object) -> None:
    """Add one decision and wait until it committed."""
    done = asyncio.Event()
    writer.add(0, [Out(topic, 0, b"run", value)], None, done.set, **kw)  # type: ignore[arg-type]
    await asyncio.wait_for(done.wait(), 30)


async def _group_offset(broker: str, group: str, tp: TopicPartition) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    meta = offsets.get(tp)
    return None if meta is None else meta.offset


async def _end(broker: str, tp: TopicPartition, isolation: str = "read_uncommitted") -> int:
    """The partition's log end (``read_uncommitted``) or last stable offset (``read_committed``)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, isolation_level=isolation)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


def test_the_second_lane_has_its_own_transactional_id_under_the_same_prefix() -> None:
    """The ACLs grant the prefix ``<group>.tx.``: the second lane's id is under it too."""
    assert transactional_id("g", 3) == "g.tx.3"
    assert transactional_id("g", 3, lane=1) == "g.tx.3.b"


async def test_decisions_on_two_lanes_commit_in_turn_once_each_and_in_order(broker: str, prefix: str) -> None:
    topic = f"{prefix}.ev"
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic, lanes=2, ahead_s=5.0)
    try:
        for i in range(12):
            await _decide(writer, topic, f"d{i}".encode(), inputs=())
    finally:
        await writer.close()
    assert failures == []
    assert writer.lane_commits == [6, 6]  # in turn: the next one never waits for the last one's markers
    assert await read_committed(broker, topic) == [f"d{i}".encode() for i in range(12)]


async def test_input_offsets_commit_on_the_first_lane_only_and_never_go_back(
    broker: str, prefix: str
) -> None:
    """Strict inputs (a command's) commit with their decision, on the first lane; lazy ones (a task
    record's) ride the second lane without their offsets, which follow with the first lane's next
    transaction. The group's committed offset only ever moves forward."""
    topic, commands, steps = f"{prefix}.ev", f"{prefix}.cmd", f"{prefix}.step"
    cmd_tp, step_tp = TopicPartition(commands, 0), TopicPartition(steps, 0)
    failures: list[BaseException] = []
    checkpoint = _Recorded()
    writer = await _writer(
        broker, f"{prefix}.tx", failures, topic, commands, steps, checkpoint=checkpoint, lanes=2, ahead_s=5
    )
    group = f"{prefix}.tx-group"
    seen: list[int] = []
    try:
        for i in range(8):
            lazy = i % 2 == 1
            tp = step_tp if lazy else cmd_tp
            inputs = [checkpoint.consumed(tp, i)]
            await _decide(writer, topic, f"d{i}".encode(), inputs=inputs, lazy=lazy)
            if not lazy:
                committed = await _group_offset(broker, group, cmd_tp)
                assert committed is not None
                seen.append(committed)
        await asyncio.wait_for(writer.flush(), 30)
    finally:
        await writer.close()
    assert failures == []
    assert writer.lane_commits[1] > 0  # the lazy decisions went on the second lane
    assert seen == sorted(seen) and seen[-1] == 7  # commands 0, 2, 4, 6: each one's offset + 1
    assert await _group_offset(broker, group, step_tp) == 8  # the last lazy input, by the flush
    for positions in checkpoint.log:
        assert positions  # offsets only ever in a transaction that carries them
    assert await read_committed(broker, topic) == [f"d{i}".encode() for i in range(8)]


@pytest.mark.parametrize(
    ("lanes", "before"),
    [(1, 1), (2, 1), (2, 2)],
    ids=["one-lane", "zombie-on-second-lane", "zombie-on-first-lane"],
)
async def test_the_next_owner_fences_each_lane_of_the_last(
    broker: str, prefix: str, lanes: int, before: int
) -> None:
    """After a second writer of the partition starts, nothing the first one writes shows, whichever lane
    its next transaction is on (the one begun ahead after ``before`` commits); once the first is closed,
    its decisions no longer count against the worker's room for uncommitted decisions."""
    topic = f"{prefix}.ev"
    first_failures: list[BaseException] = []
    second_failures: list[BaseException] = []
    gate = Gate(100)
    first = await _writer(broker, f"{prefix}.tx", first_failures, topic, gate=gate, lanes=lanes, ahead_s=5.0)
    second: TxnWriter | None = None
    try:
        for i in range(before):
            await _decide(first, topic, f"before-{i}".encode(), inputs=())
        assert sum(first.lane_commits) == before
        second = await _writer(broker, f"{prefix}.tx", second_failures, topic, lanes=lanes, ahead_s=5.0)
        committed_late: list[bool] = []
        first.add(0, [Out(topic, 0, b"run", b"zombie")], None, lambda: committed_late.append(True), inputs=())
        await asyncio.wait_for(first.flush(), 30)
        await _decide(second, topic, b"after", inputs=())
    finally:
        await first.close()
        if second is not None:
            await second.close()
    assert len(first_failures) == 1 and isinstance(first_failures[0], FENCED), first_failures
    assert committed_late == []
    assert gate.pending == 0  # the zombie's decision was taken into its fenced transaction, then let go
    assert second_failures == []
    expected = [f"before-{i}".encode() for i in range(before)] + [b"after"]
    assert await read_committed(broker, topic) == expected


async def test_a_transaction_begun_ahead_is_aborted_when_nothing_comes_or_the_writer_closes(
    broker: str, prefix: str
) -> None:
    """A record and a commit marker, then the abort marker of the transaction begun ahead: once after
    ``ahead_s`` with nothing to write, once when the writer closes; none is left open to hold back a
    ``read_committed`` reader or the next owner."""
    topic = f"{prefix}.ev"
    tp = TopicPartition(topic, 0)
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic, lanes=2, ahead_s=0.2)
    try:
        await _decide(writer, topic, b"one", inputs=())
        for _ in range(300):
            if await _end(broker, tp) >= 3:
                break
            await asyncio.sleep(0.1)
        assert await _end(broker, tp) == 3  # record, commit marker, abort marker
        await _decide(writer, topic, b"two", inputs=())
        for _ in range(300):  # the next one is begun ahead again
            if writer.begun_ahead:
                break
            await asyncio.sleep(0.01)
        assert writer.begun_ahead
    finally:
        await writer.close()
    assert failures == []
    assert await _end(broker, tp) == 6  # closed: its abort marker is written
    assert await _end(broker, tp, "read_committed") == 6  # nothing open holds the stable offset back
    assert await read_committed(broker, topic) == [b"one", b"two"]


async def test_a_transaction_begun_ahead_that_expires_while_the_first_lane_commits_is_aborted(
    broker: str, prefix: str
) -> None:
    """Strict offsets keep two decisions in a row on the first lane, so the transaction begun ahead on the
    second waits; its ``ahead_s`` runs out while the first lane commits (held up here for a second). It is
    still aborted once that commit returns, not left open until a decision comes."""
    topic, commands = f"{prefix}.ev", f"{prefix}.cmd"
    tp, cmd_tp = TopicPartition(topic, 0), TopicPartition(commands, 0)
    failures: list[BaseException] = []
    checkpoint = _Recorded()
    writer = await _writer(
        broker, f"{prefix}.tx", failures, topic, commands, checkpoint=checkpoint, lanes=2, ahead_s=1.0
    )
    try:
        # d0 commits on the first lane, and the next transaction is begun ahead on the second
        await _decide(writer, topic, b"d0", inputs=[checkpoint.consumed(cmd_tp, 0)])
        first = writer._lanes[0]
        commit = first.commit_transaction

        async def slow_commit() -> None:
            await asyncio.sleep(2.5)  # longer than ahead_s: the transaction begun ahead expires meanwhile
            await commit()

        first.commit_transaction = slow_commit
        await _decide(writer, topic, b"d1", inputs=[checkpoint.consumed(cmd_tp, 1)])
        settled = False
        for _ in range(300):  # d0, its commit marker, d1, its commit marker, then the abort marker
            end = await _end(broker, tp)
            stable = await _end(broker, tp, "read_committed")
            settled = not writer.begun_ahead and end >= 5 and stable == end
            if settled:
                break
            await asyncio.sleep(0.1)
        assert settled  # nothing begun ahead is left open, nothing holds the stable offset back
        assert writer.lane_commits == [2, 0]
    finally:
        await writer.close()
    assert failures == []
    assert await read_committed(broker, topic) == [b"d0", b"d1"]


async def _held_commit(writer: TxnWriter, lane: int) -> asyncio.Event:
    """Hold ``lane``'s next commits until the returned event is set: the test decides when they may go."""
    producer = writer._lanes[lane]
    commit = producer.commit_transaction
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()
        await commit()

    producer.commit_transaction = held  # type: ignore[method-assign]
    return release


async def _two_in_flight(broker: str, writer: TxnWriter, topic: str, committed: list[str]) -> asyncio.Event:
    """Add d1 (its commit held: the returned event lets it go), then d2 once d1's record is in the log;
    return once d2's record is in the log too, sent while d1's commit waits."""
    tp = TopicPartition(topic, 0)
    release = await _held_commit(writer, 1)  # the first transaction goes on the second lane
    for n, name in enumerate(("d1", "d2"), 1):
        writer.add(
            0, [Out(topic, 0, b"run", name.encode())], None, lambda d=name: committed.append(d), inputs=()
        )
        await until(lambda n=n: _at_least(broker, tp, n), 30, f"{name}'s record in the log")
    return release


async def _at_least(broker: str, tp: TopicPartition, n: int) -> bool:
    return await _end(broker, tp) >= n


async def test_the_next_transaction_is_sent_while_the_last_commits_and_commits_after_it(
    broker: str, prefix: str
) -> None:
    """Two in flight: while d1's commit is on its way (held here), d2's records go out on the other lane,
    and d2 commits only once d1 has (its decisions may follow from d1's)."""
    topic = f"{prefix}.ev"
    tp = TopicPartition(topic, 0)
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic, lanes=2, ahead_s=5.0)
    committed: list[str] = []
    try:
        release = await _two_in_flight(broker, writer, topic, committed)
        assert committed == []  # neither commits before d1's commit goes
        assert await _end(broker, tp, "read_committed") == 0
        release.set()
        await asyncio.wait_for(writer.flush(), 30)
    finally:
        await writer.close()
    assert failures == []
    assert committed == ["d1", "d2"]
    assert writer.lane_commits == [1, 1]
    assert await read_committed(broker, topic) == [b"d1", b"d2"]


async def test_a_failed_commit_leaves_the_transaction_sent_after_it_uncommitted(
    broker: str, prefix: str
) -> None:
    """d1's commit fails (its lane's id is fenced while the commit is held) after d2 went out on the other
    lane: the writer fails, d2 never commits, and the next owner's start aborts it."""
    topic = f"{prefix}.ev"
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic, lanes=2, ahead_s=5.0)
    committed: list[str] = []
    second: TxnWriter | None = None
    try:
        release = await _two_in_flight(broker, writer, topic, committed)
        fence = AIOKafkaProducer(bootstrap_servers=broker, transactional_id=f"{prefix}.tx.b")
        await fence.start()  # inits the second lane's id: d1's transaction aborted, the writer fenced
        await fence.stop()
        release.set()
        await asyncio.wait_for(writer.flush(), 30)  # returns once the writer failed
        assert writer.failed is not None
        second = await _writer(broker, f"{prefix}.tx", [], topic, lanes=2, ahead_s=5.0)  # aborts d2's
        await _decide(second, topic, b"after", inputs=())
    finally:
        await writer.close()
        if second is not None:
            await second.close()
    assert len(failures) == 1 and isinstance(failures[0], FENCED), failures
    assert committed == []
    assert await read_committed(broker, topic) == [b"after"]

"""A commit's callbacks, a few per turn of the loop (``streams.aftercommit``): in commit order, all of them
before a flush returns, and one that raises fails its writer; against the real broker where a writer is."""

from __future__ import annotations

import asyncio

from calmrun.streams.aftercommit import AfterCommit
from calmrun.streams.records import Out
from calmrun.streams.txn import TxnWriter
from tests.runtime_support import until
from tests.streams.test_runtime_eager import _writer, read_committed


async def _two_lanes(broker: str, prefix: str) -> tuple[str, list[BaseException], TxnWriter]:
    """A writer of two lanes on a new topic, and the list its failures go to."""
    topic = f"{prefix}.ev"
    failures: list[BaseException] = []
    return topic, failures, await _writer(broker, f"{prefix}.tx", failures, topic, lanes=2)


async def test_callbacks_run_a_few_per_turn_of_the_loop_in_the_order_queued() -> None:
    ran: list[int] = []
    seen_after_first_turn: list[int] = []
    outcome: list[BaseException | None] = []
    done = asyncio.Event()

    def ended(exc: BaseException | None) -> None:
        outcome.append(exc)
        done.set()

    after = AfterCommit(ended, per_turn=4)
    loop = asyncio.get_running_loop()

    def callback(i: int) -> None:
        ran.append(i)
        if i == 0:  # scheduled now: runs before the next turn of callbacks
            loop.call_soon(lambda: seen_after_first_turn.append(len(ran)))

    after.extend(lambda i=i: callback(i) for i in range(10))
    after.extend(lambda i=i: callback(i) for i in range(10, 13))  # queued later: runs later
    assert ran == [] and len(after) == 13  # none in the turn that queued them
    await asyncio.wait_for(done.wait(), 10)
    assert ran == list(range(13))
    assert seen_after_first_turn == [4]
    assert outcome == [None] and len(after) == 0


async def test_a_callback_that_raises_ends_the_queue_with_its_error() -> None:
    ran: list[int] = []
    outcome: list[BaseException | None] = []
    boom = RuntimeError("boom")

    def callback(i: int) -> None:
        if i == 2:
            raise boom
        ran.append(i)

    after = AfterCommit(outcome.append, per_turn=16)
    after.extend(lambda i=i: callback(i) for i in range(5))
    for _ in range(3):
        await asyncio.sleep(0)
    assert ran == [0, 1] and outcome == [boom] and len(after) == 0


async def test_run_all_runs_what_is_queued_now_and_tells_a_raise_instead_of_raising() -> None:
    ran: list[int] = []
    outcome: list[BaseException | None] = []
    boom = RuntimeError("boom")

    def callback(i: int) -> None:
        if i == 30:
            raise boom
        ran.append(i)

    after = AfterCommit(outcome.append, per_turn=4)
    after.extend(lambda i=i: callback(i) for i in range(20))
    after.run_all()  # a writer closing: no turn of the loop in between
    assert ran == list(range(20)) and len(after) == 0
    after.extend(lambda i=i: callback(i) for i in range(30, 32))
    after.run_all()
    assert ran == list(range(20)) and outcome == [boom]


async def test_a_writer_runs_every_callback_of_a_large_commit_in_order_before_its_flush_returns(
    broker: str, prefix: str
) -> None:
    topic, failures, writer = await _two_lanes(broker, prefix)
    ran: list[int] = []
    try:
        for i in range(100):  # one batch: more callbacks than one turn runs
            out = Out(topic, 0, b"run", f"d{i}".encode())
            writer.add(0, [out], None, lambda i=i: ran.append(i), inputs=())
        await asyncio.wait_for(writer.flush(), 30)
        assert ran == list(range(100))
    finally:
        await writer.close()
    assert failures == []
    expected = [f"d{i}".encode() for i in range(100)]

    async def visible() -> bool:  # once the commit's markers are written (just after it returns)
        return await read_committed(broker, topic) == expected

    await until(visible, what="the 100 records, read_committed")


async def test_a_callback_that_raises_fails_its_writer_as_a_failed_commit_does(
    broker: str, prefix: str
) -> None:
    topic, failures, writer = await _two_lanes(broker, prefix)
    boom = RuntimeError("an on_commit bug")

    def bad() -> None:
        raise boom

    try:
        writer.add(0, [Out(topic, 0, b"run", b"d0")], None, bad, inputs=())
        await asyncio.wait_for(writer.flush(), 30)  # returns: the writer failed
    finally:
        await writer.close()
    assert writer.failed is boom
    assert failures == [boom]

"""Tasks started before their decision commits (``worker.early``) and the transaction that waits for them.

A task decided from a committed input (a request) starts at once; one decided from a local agent's result
only once that result is committed (a re-run could return another). The partition's next transaction waits
``worker.inline_wait_ms`` at most for the tasks started early: a fast step's result commits with the
request, a slow one's later, without holding the request back.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry, StepContext
from calmrun.client import Client
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics, partition_for
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, add_one, linear, ready, running, settings_for, until

N = 20


async def event_records(broker: str, prefix: str, run_id: str) -> list[tuple[int, bytes]]:
    """(offset, type) of the run's committed events, in the order of its partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tp = TopicPartition(Topics(prefix).events, partition_for(run_id, 4))
        return [
            (r.offset, dict(r.headers)["type"])
            async for r in read_to_end(consumer, [tp])
            if r.key == run_id.encode()
        ]
    finally:
        await consumer.stop()


async def test_only_a_request_starts_its_task_before_the_commit(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"e{i}") for i in range(N)
            )
            states = await client.wait_terminal(ids, wait_s=60)
        stats = w.stats
    assert {s.status for s in states.values()} == {"completed"}
    # s1 of each run started early (decided from its request); s2 and s3 from s1's and s2's results: never.
    # A task started after its commit may start from its own record read back instead (eager=False) when
    # the reader is quicker than the commit's callback on a busy machine; either way each attempt runs once.
    assert stats.decisions_early == N
    assert stats.tasks_started == 3 * N
    assert stats.tasks_eager >= N  # the early ones at least: their records cannot be read before the commit


async def test_a_fast_first_step_commits_in_the_request_s_transaction(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix, inline_wait_ms=60_000)  # waits for the step, however busy
    one = linear("one", 1)
    async with running(settings, [one], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            (rid,) = await client.submit_many([RunRequest(workflow="one", input={"n": 1}, run_id="f1")])
            states = await client.wait_terminal([rid], wait_s=60)
    assert states[rid].status == "completed"
    records = await event_records(broker, prefix, rid)
    assert records[0][1] == b"run.requested" and records[-1][1] == b"run.completed"
    offsets = [o for o, _ in records]
    # one transaction: no commit marker (which takes an offset) between the request's events and the end
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), records


async def test_a_slow_first_step_does_not_hold_the_request_back(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix, inline_wait_ms=50)
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(ctx: StepContext, item: Item) -> Out:
        started.set()
        await release.wait()
        return Out(n=item.n + 1)

    one = linear("one", 1, agent="slow")
    async with running(settings, [one], AgentRegistry({"slow": slow})) as w:
        await ready(w)
        async with Client(settings) as client:
            (rid,) = await client.submit_many([RunRequest(workflow="one", input={"n": 1}, run_id="s1")])
            await asyncio.wait_for(started.wait(), 60)

            async def requested() -> bool:
                return any(t == b"run.requested" for _, t in await event_records(broker, prefix, rid))

            found = False
            end = asyncio.get_running_loop().time() + 60
            while not found:  # the request's decision commits while its step still runs
                found = await requested()
                assert asyncio.get_running_loop().time() < end, "the request waited for its slow step"
            assert not release.is_set()
            release.set()
            states = await client.wait_terminal([rid], wait_s=60)
        await until(lambda: w.stats.completed == 1, 30, "the run's completion")
    assert states[rid].status == "completed"

"""A worker stopped while its first assignment is being taken (a SIGTERM right after its start) against the
real broker: the stop waits for that assignment and closes the writer it made; nothing is taken after."""

from __future__ import annotations

import asyncio

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.streams.worker import Worker
from tests.runtime_support import add_one, linear, ready, running, settings_for, until


async def test_a_stop_during_an_assignment_leaves_no_writer_open(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    wf, agents = linear(), AgentRegistry({"add_one": add_one})
    async with running(settings, [wf], agents) as first:
        await ready(first)
        second = Worker(settings, [wf], agents, ModelRegistry({}))
        await second.start()
        # the rebalance that gives it partitions holds the ownership lock while it takes them
        await until(lambda: second.parts.lock.locked(), 60, "the second worker's assignment to begin")
        await second.stop()
        await asyncio.sleep(2)  # a callback the stop did not wait for would make its writer now
        assert second.parts.writer is None and second.parts.owned == set()
        await until(lambda: first.parts.owned == {0, 1, 2, 3}, 60, "the first worker to own every partition")

"""``worker.task_records: auto`` against the real broker: no task records while every member of the group
resumes from states, every one while a member that does not (an older worker, or one configured to write
them) is in the group, and none again once it has left."""

from __future__ import annotations

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.kafka.topics import Topics
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, ready, running, settings_for, until
from tests.streams.test_runtime_eager import task_records

N = 12


async def test_auto_writes_task_records_only_while_a_member_needs_them(broker: str, prefix: str) -> None:
    wf, agents = linear(), AgentRegistry({"add_one": add_one})
    auto = settings_for(broker, prefix)  # the default: auto
    steps = Topics(prefix).step_topics([wf])
    assert auto.worker.task_records == "auto"
    async with running(auto, [wf], agents) as a, Client(auto) as client:
        await ready(a)

        async def batch(tag: str) -> None:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"{tag}{i}") for i in range(N)
            )
            states = await client.wait_terminal(ids, wait_s=90)
            assert {s.status for s in states.values()} == {"completed"}, states

        await batch("alone")
        assert a.assignor.group_resumes
        assert await task_records(broker, steps) == 0  # alone, it resumes from states: nothing written
        # a member that resumes nothing joins (here one that writes task records; an older worker alike)
        async with running(settings_for(broker, prefix, task_records=True), [wf], agents) as b:
            await until(
                lambda: a.parts.owned and b.parts.owned and not a.assignor.group_resumes, 60, "a shared group"
            )
            await batch("shared")
            shared = await task_records(broker, steps)
            assert shared == 3 * N  # every task of the shared group's runs, whichever member decided it
        await until(lambda: a.parts.owned == {0, 1, 2, 3} and a.assignor.group_resumes, 60, "a alone again")
        await batch("again")
        assert await task_records(broker, steps) == shared  # none written since the other member left

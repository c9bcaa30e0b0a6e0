"""The workflow runtime against the real broker: happy path, history, duplicates."""

from __future__ import annotations

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, running, settings_for


async def test_linear_runs_complete_with_history(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    wf = linear()
    async with running(settings, [wf], AgentRegistry({"add_one": add_one})), Client(settings) as client:
        ids = await client.submit_many(
            RunRequest(workflow="lin", input={"n": i}, run_id=f"r{i}") for i in range(20)
        )
        states = await client.wait_terminal(ids, wait_s=60)
    assert {s.status for s in states.values()} == {"completed"}
    assert states["r5"].steps["s3"].output == {"n": 8, "label": "s3:1"}
    async with Client(settings) as client:
        events = await client.events("r5")
    assert [e.type for e in events if e.step == "s1" or e.step is None][:3] == [
        "run.requested",
        "step.scheduled",
        "step.succeeded",
    ]
    applied = [e.seq for e in events if e.seq > 0]
    assert applied == list(range(1, len(applied) + 1))

"""One run's state and events are read without decoding the other runs' records."""

from __future__ import annotations

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, ready, running, settings_for


async def test_a_runs_events_are_found_from_its_request_time_and_without_it(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w, Client(settings) as c:
        await ready(w)
        ids = await c.submit_many(
            RunRequest(workflow="lin", input={"n": i}, run_id=f"e{i}") for i in range(20)
        )
        await c.wait_terminal(ids, wait_s=60)
        everything = await c.events()
        for rid in ("e0", "e7", "e19"):
            state = await c.state(rid)
            assert state is not None and state.run_id == rid and state.status == "completed"
            mine = [e for e in everything if e.run_id == rid]
            assert len(mine) == 8  # three steps: the request, 3 x (scheduled, succeeded), the end
            assert await c.run_events(state) == mine
            # a client clock far ahead: the seek finds no request, the whole partition is read instead
            ahead = state.model_copy(update={"created_ms": state.created_ms + 86_400_000})
            assert await c.run_events(ahead) == mine
        assert await c.state("nobody") is None

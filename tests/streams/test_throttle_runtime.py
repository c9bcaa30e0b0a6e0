"""Limits per model alias and step in a worker on the real broker: scripted models, a real HTTP provider.

The scripted models (pydantic-ai ``FunctionModel``) record how many requests of their alias are inside
at once and when each arrived; the provider answering 429 is ``FakeOpenAI`` (an OpenAI-compatible HTTP
server on 127.0.0.1) reached through pydantic-ai's OpenAI model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.settings import ModelAlias, load_settings
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunRequest
from tests.agents.test_model_faults import fake_openai
from tests.runtime_support import ready

talk = Agent(output_type=str, name="talk")


class Said(BaseModel):
    text: str


INSIDE: dict[str, int] = {}
"""Attempts of each ``<workflow>/<step>`` inside ``speak`` now (reset by the test that reads it)."""
PEAK: dict[str, int] = {}


async def speak(ctx: StepContext, inp: dict[str, Any]) -> Said:
    key = f"{ctx.workflow}/{ctx.step}"
    INSIDE[key] = INSIDE.get(key, 0) + 1
    PEAK[key] = max(PEAK.get(key, 0), INSIDE[key])
    try:
        result = await ctx.run(talk, "hello")
    finally:
        INSIDE[key] -= 1
    return Said(text=result.output)


class Scripted:
    """A FunctionModel per alias that records concurrent entries; each call takes 0.1 s."""

    def __init__(self) -> None:
        self.inside: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def model(self, alias: str) -> FunctionModel:
        async def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            self.calls[alias] = self.calls.get(alias, 0) + 1
            self.inside[alias] = self.inside.get(alias, 0) + 1
            self.peak[alias] = max(self.peak.get(alias, 0), self.inside[alias])
            try:
                await asyncio.sleep(0.1)
            finally:
                self.inside[alias] -= 1
            return ModelResponse(parts=[TextPart("hi")])

        return FunctionModel(answer)


def two_steps(name: str, alias: str, agent: str = "speak") -> WorkflowDef:
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {"name": "a", "agent": agent, "model": alias, "next": "b", "timeout_s": 60},
                {"name": "b", "agent": agent, "model": alias, "timeout_s": 60},
            ],
        }
    )


def settings(broker: str, prefix: str, **throttle: Any) -> Any:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        throttle=throttle,
    )


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The largest number of ``times`` inside one half-open window ``[t, t + window_s)``."""
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + window_s) for t in times), default=0)


async def test_concurrency_and_rate_per_alias_hold_across_steps_and_spare_other_aliases(
    broker: str, prefix: str
) -> None:
    """What the limiter promises, whatever the machine's load: never more attempts of a limited alias or
    step at once than its permits, never more starts of a paced alias in any window than its rate allows,
    and no task waits on a limit that is not its own (an unlimited alias is never held)."""
    script = Scripted()
    INSIDE.clear()
    PEAK.clear()
    aliases = ("lim", "free", "paced")
    models = ModelRegistry({}, overrides={a: script.model(a) for a in aliases})
    wfs = [two_steps(f"w_{a}", a) for a in aliases]
    s = settings(
        broker,
        prefix,
        models={"lim": {"max_concurrency": 2}, "paced": {"requests_per_minute": 600}},
        steps={"w_free/b": {"max_concurrency": 3}},
    )
    requests = [RunRequest(workflow=f"w_{a}", input={}, run_id=f"{a}{i}") for a in aliases for i in range(12)]
    started: dict[str, list[float]] = {}  # limited task's alias or step -> when the throttle let it start
    async with Worker(s, wfs, AgentRegistry({"speak": speak}), models) as worker, Client(s) as client:
        worker.throttle.started = lambda task, now: started.setdefault(task.model or "", []).append(now)
        await ready(worker)
        ids = await client.submit_many(requests)
        states = await client.wait_terminal(ids, wait_s=90)
    assert {st.status for st in states.values()} == {"completed"}
    assert script.calls == {"lim": 24, "free": 24, "paced": 24}
    # max_concurrency 2 on lim: both steps of w_lim share the alias's two permits
    assert script.peak["lim"] <= 2
    # max_concurrency 3 on the step w_free/b only
    assert PEAK["w_free/b"] <= 3
    # 600 requests per minute, burst 1: starts at least 0.1 s apart, so at most 10 in any second (1 ms
    # less than a second, so that two starts exactly 1.0 s apart in floating point are not both counted)
    paced = started["paced"]
    assert len(paced) == 24
    assert most_in_any_window(paced, 0.999) <= 10, sorted(paced)
    assert min(b - a for a, b in zip(sorted(paced), sorted(paced)[1:], strict=False)) >= 0.1 - 1e-6
    # no alias waits on another's limits: only the limits configured appear among the waits, and the
    # unlimited alias's step a never passes through the throttle at all
    counts = worker.throttle.counts
    assert set(counts.waits) <= {("model", "lim"), ("rate", "paced"), ("step", "w_free/b")}, counts.waits
    assert len(started["free"]) == 12  # w_free/b's starts only: w_free/a has no limit to pass


async def test_a_429_pauses_its_alias_for_other_steps_and_workflows_on_the_worker(
    broker: str, prefix: str
) -> None:
    async with fake_openai() as fake:
        remote = ModelAlias(model="openai:once429-1", base_url=fake.base_url, output_mode="prompted")
        models = ModelRegistry({"remote": remote})
        ask = "tests.agents.test_model_faults:ask"
        first = parse_workflow(
            {
                "name": "first",
                "steps": [{"name": "ask", "agent": ask, "model": "remote", "input": {"question": "input.q"}}],
            }
        )
        other = parse_workflow(
            {
                "name": "other",
                "steps": [
                    {"name": "check", "agent": ask, "model": "remote", "input": {"question": "input.q"}}
                ],
            }
        )
        s = settings(broker, prefix, retry_after_default_s=30)
        metrics = WorkerMetrics(CollectorRegistry())
        async with (
            Worker(s, [first, other], AgentRegistry(), models, metrics=metrics) as worker,
            Client(s) as client,
        ):
            await ready(worker)
            (x,) = await client.submit_many([RunRequest(workflow="first", input={"q": "6*7?"}, run_id="x")])
            end = time.monotonic() + 30
            while "remote" not in worker.throttle.paused():  # the 429 is in
                assert time.monotonic() < end, "the provider's 429 never paused the alias"
                await asyncio.sleep(0.02)
            left = metrics.registry.get_sample_value("calmrun_model_paused_seconds", {"alias": "remote"})
            assert left is not None and 0 < left <= 2
            (y,) = await client.submit_many([RunRequest(workflow="other", input={"q": "1+1?"}, run_id="y")])
            states = await client.wait_terminal([x, y], wait_s=60)
            events = await client.events()
    assert {st.status for st in states.values()} == {"completed"}
    chats = [r for r in fake.requests if r["path"].endswith("/chat/completions")]
    assert len(chats) == 3  # x's 429, x's retry, y
    refused_at = chats[0]["t"]
    assert all(r["t"] - refused_at >= 1.95 for r in chats[1:]), [r["t"] - refused_at for r in chats]
    assert worker.throttle.counts.pauses == {"remote": 1}
    assert worker.throttle.counts.waits[("paused", "remote")] >= 1
    assert metrics.registry.get_sample_value("calmrun_model_pauses_total", {"alias": "remote"}) == 1
    (done,) = [e for e in events if e.run_id == "y" and e.type == "step.succeeded"]
    assert done.cost is not None and done.cost.queue_wait_ms > 1_000  # y waited out the pause

"""Cost per request: each model request of an agent and a delegated agent's usage, in status and Prometheus.

The step's agent calls a tool that delegates to another agent with the caller's usage; the attempt's
``StepCost`` (tokens, money) equals the sum of its request rows, the status table shows them, and the
worker's registry counts them. Real broker, in-process worker, FunctionModel models.
"""

from __future__ import annotations

import io
from decimal import Decimal
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from rich.console import Console

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.agents.requestcosts import totals
from calmrun.cli import runs as runs_cli
from calmrun.client import Client
from calmrun.settings import ModelAlias, load_settings
from calmrun.streams.journal import read_request_costs
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import ready


def _outer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    turns = sum(1 for m in messages if isinstance(m, ModelResponse))
    if turns < 2:
        return ModelResponse(parts=[ToolCallPart("consult", {"question": f"q{turns}"})])
    return ModelResponse(parts=[TextPart("advised")])


helper = Agent(FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("advice " * 30)])), name="helper")
advisor = Agent(name="advisor", instructions="Consult twice, then answer.")


@advisor.tool
async def consult(ctx: RunContext[None], question: str) -> str:
    """Delegate to the helper agent, counting its usage in the caller's."""
    result = await helper.run(question, usage=ctx.usage)
    return result.output


async def test_each_request_and_delegated_usage_is_costed_and_adds_up_to_the_attempt(
    broker: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    price = {"price_in_per_mtok": Decimal(3), "price_out_per_mtok": Decimal(15)}
    settings = load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        models={"smart": ModelAlias(model="openai:gpt-4o", base_url="http://127.0.0.1:9/v1", **price)},
    )
    models = ModelRegistry(settings.models, overrides={"smart": FunctionModel(_outer)})
    wf = parse_workflow(
        {"name": "advise", "steps": [{"name": "ask", "agent": "advisor", "model": "smart", "input": {}}]}
    )
    metrics = WorkerMetrics(CollectorRegistry())
    run_id = f"adv-{uuid4().hex[:8]}"
    worker = Worker(settings, [wf], AgentRegistry({"advisor": advisor}), models, metrics=metrics)
    await worker.start()
    try:
        await ready(worker)
        async with Client(settings) as client:
            await client.submit(RunRequest(workflow="advise", run_id=run_id, input={}))
            states = await client.wait_terminal([run_id], wait_s=120)
            events = await client.events(run_id)
    finally:
        await worker.stop()
    assert states[run_id].status == "completed", states[run_id]
    (done,) = [e for e in events if e.type == "step.succeeded"]
    assert done.cost is not None

    rows = await read_request_costs(settings, run_id)
    assert [r.kind for r in rows] == ["model", "delegated", "model", "delegated", "model"]
    (total,) = totals(rows, "attempt").values()
    assert (total.tokens_in, total.tokens_out) == (done.cost.tokens_in, done.cost.tokens_out)
    assert total.requests == done.cost.requests == 5  # 3 of the advisor, 2 of the helper it delegated to
    assert total.cost_usd == done.cost.cost_usd > 0
    assert all(r.cost_usd > 0 and r.tokens_in > 0 for r in rows)

    registry = metrics.registry
    model_rows = registry.get_sample_value(
        "calmrun_agent_requests_total", {"alias": "smart", "model": "function:_outer:", "kind": "model"}
    )
    delegated = registry.get_sample_value(
        "calmrun_agent_requests_total", {"alias": "smart", "model": "-", "kind": "delegated"}
    )
    assert (model_rows, delegated) == (3, 2)
    counted = registry.get_sample_value(
        "calmrun_agent_request_tokens_total", {"alias": "smart", "direction": "in"}
    )
    assert counted == done.cost.tokens_in
    assert registry.get_sample_value("calmrun_agent_request_seconds_count", {"alias": "smart"}) == 3

    text = io.StringIO()
    monkeypatch.setattr(runs_cli, "out", Console(file=text, width=200))
    runs_cli.print_status(states[run_id], events, None, rows)
    assert "agent requests" in text.getvalue() and "delegated by tool consult" in text.getvalue()

"""Traces on the real broker, exported to a real Jaeger and read back from its query API.

A run with a retry, an approval and a pooled step arrives as one trace: the run's root span, a span per
decision, per attempt (queue, execute with pydantic-ai's model spans inside, commit) and per wait, the
pooled attempt from the pool executor's process, its result's decision linked to it; the deciding worker is
replaced mid-run and a traced caller's span is linked from the request's decision.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.devjaeger import DevJaeger
from calmrun.settings import Settings, load_settings
from calmrun.streams.pool import PoolExecutor
from calmrun.streams.worker import Worker
from calmrun.tracing import NO_TRACING, TRACEPARENT, parse_traceparent, run_ids
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunCommand, RunRequest
from tests.runtime_support import Item, Out, poll_states, read_raw, ready, until

triage_agent: Agent[None, str] = Agent(output_type=str)


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart("refund")])


async def classify(ctx: StepContext, item: Item) -> Out:
    result = await ctx.run(triage_agent, f"classify: {item.text}")
    if ctx.attempt == 1:
        raise RuntimeError("classifier flaked")  # after its model call: the retry is traced, tokens too
    return Out(n=item.n, label=result.output)


async def ship(ctx: StepContext, item: Item) -> Out:
    return Out(n=item.n + 1, label="shipped")


def refund_flow() -> WorkflowDef:
    return parse_workflow(
        {
            "name": "refund",
            "steps": [
                {
                    "name": "classify",
                    "agent": "classify",
                    "model": "fast",
                    "retry": {"max_attempts": 3, "initial_backoff_s": 0.2, "jitter": 0},
                    "input": {"n": "input.n", "text": "input.text"},
                    "next": "approve",
                },
                {"name": "approve", "kind": "approval", "approvers": ["alice"], "next": "ship"},
                {"name": "ship", "agent": "ship", "pool": "gpu", "input": {"n": "steps.classify.n"}},
            ],
        }
    )


def traced(broker: str, prefix: str, endpoint: str | None, **worker: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, **worker},
        models={"fast": {"model": "function:tests.tracing.test_traces:scripted"}},
        tracing={"endpoint": endpoint} if endpoint else {},
    )


@pytest.fixture
async def started() -> AsyncIterator[list[Worker | PoolExecutor]]:
    items: list[Worker | PoolExecutor] = []
    try:
        yield items
    finally:
        for it in reversed(items):
            await it.stop()


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span.get("tags", [])}


def parent(span: dict[str, Any]) -> str | None:
    refs = [r["spanID"] for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
    return refs[0] if refs else None


async def test_a_run_with_a_retry_an_approval_and_a_pooled_step_is_one_trace(
    broker: str, prefix: str, jaeger: DevJaeger, started: list[Worker | PoolExecutor]
) -> None:
    settings = traced(broker, prefix, jaeger.otlp_endpoint)
    wf = refund_flow()
    agents = AgentRegistry({"classify": classify, "ship": ship})
    worker = Worker(settings, [wf], agents, ModelRegistry(settings.models))
    started.append(worker)
    await worker.start()
    await ready(worker)
    executor = PoolExecutor(settings, [wf], "gpu", agents, ModelRegistry(settings.models))
    started.append(executor)
    await executor.start()

    caller = TracerProvider().get_tracer("shop")  # a traced service that starts the run
    async with Client(settings) as client:
        with caller.start_as_current_span("checkout") as checkout:
            request = RunRequest(workflow="refund", input={"n": 1, "text": "order 1234"})
            run_id = await client.submit(request)

        await poll_states(
            client,
            [run_id],
            lambda st: "approve" in st.steps and st.steps["approve"].status == "waiting",
            90,
            "the run to wait for its approval",
        )
        await worker.stop()  # the run moves to another worker (another process's tracer) mid-run
        worker = Worker(settings, [wf], agents, ModelRegistry(settings.models))
        started.insert(0, worker)
        await worker.start()
        await ready(worker)
        await client.command(
            RunCommand(command="approve", run_id=run_id, workflow="refund", step="approve", by="alice")
        )
        final = (await client.wait_terminal([run_id], wait_s=90))[run_id]
    assert final.status == "completed" and final.steps["classify"].attempt == 2

    # the tasks carry the run's trace on Kafka, for executors in any language (docs/traces.md)
    trace_id, root_id = run_ids(prefix, run_id)
    task_records = await read_raw(broker, f"{prefix}.step.refund.ship")
    parents = [parse_traceparent(dict(r.headers).get(TRACEPARENT)) for r in task_records]
    assert parents and all(p is not None and (p.trace_id, p.span_id) == (trace_id, root_id) for p in parents)

    for it in reversed(started):  # stopping exports what is queued
        await it.stop()

    expected = {
        "run refund",
        "decide request",
        "attempt classify#1",
        "attempt classify#2",
        "wait timer classify",
        "wait approval approve",
        "decide answer approve",
        "attempt ship#1",
        "decide result ship#1",
    }
    found: dict[str, Any] = {}

    def complete() -> bool:
        got = jaeger.trace(trace_id)
        found["trace"] = got
        names = {s["operationName"] for s in got["spans"]} if got else set()
        return expected <= names

    await until(complete, 60, "the run's spans in Jaeger")
    trace = found["trace"]
    spans = trace["spans"]
    by_id = {s["spanID"]: s for s in spans}
    named: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        named.setdefault(s["operationName"], []).append(s)
    service = {pid: p["serviceName"] for pid, p in trace["processes"].items()}

    assert {s["traceID"] for s in spans} == {f"{trace_id:032x}"}
    (root,) = named["run refund"]
    assert root["spanID"] == f"{root_id:016x}" and parent(root) is None
    assert tags(root)["calmrun.status"] == "completed" and tags(root)["calmrun.run_id"] == run_id

    # decisions, attempts and waits hang from the run
    for name in expected - {"run refund"}:
        for s in named[name]:
            assert parent(s) == root["spanID"], name
    first, second = named["attempt classify#1"][0], named["attempt classify#2"][0]
    assert tags(first)["error"] is True and tags(first)["error.type"] == "RuntimeError"
    a2 = tags(second)
    assert a2["calmrun.step"] == "classify" and a2["calmrun.attempt"] == 2 and a2["calmrun.pool"] == "default"
    assert a2["calmrun.workflow"] == "refund" and a2["calmrun.tenant"] == "default"
    assert a2["gen_ai.request.model"] == "tests.tracing.test_traces:scripted"
    assert a2["gen_ai.usage.input_tokens"] > 0 and "calmrun.cost_usd" in a2
    for attempt in (first, second):
        children = {s["operationName"] for s in spans if parent(s) == attempt["spanID"]}
        assert children == {"queue", "execute", "commit"}

    # pydantic-ai's model request nests in the attempt's execution
    def ancestors(span: dict[str, Any]) -> list[str]:
        out = []
        while (up := parent(span)) is not None and up in by_id:
            span = by_id[up]
            out.append(span["operationName"])
        return out

    model_spans = [s for s in spans if s["operationName"].startswith("chat ")]
    assert len(model_spans) == 2  # one per classify attempt
    for s in model_spans:
        assert ancestors(s)[-3:] in (
            ["execute", "attempt classify#1", "run refund"],
            ["execute", "attempt classify#2", "run refund"],
        )
        assert "gen_ai.request.model" in tags(s) or "gen_ai.response.model" in tags(s)

    # the pooled attempt ran in the pool executor's process; its result's decision links to it
    (shipped,) = named["attempt ship#1"]
    assert service[shipped["processID"]] == "calmrun.pool.gpu" and tags(shipped)["calmrun.pool"] == "gpu"
    assert service[root["processID"]] == "calmrun"
    (decided,) = named["decide result ship#1"]
    assert [r["spanID"] for r in decided["references"] if r["refType"] == "FOLLOWS_FROM"] == [
        shipped["spanID"]
    ]
    (waited,) = named["wait approval approve"]
    assert tags(waited)["calmrun.wait_outcome"] == "succeeded"

    # before and after the move: two workers' spans, one trace
    first_worker = named["decide request"][0]["processID"]
    assert named["decide answer approve"][0]["processID"] not in (first_worker, shipped["processID"])
    assert service[named["decide answer approve"][0]["processID"]] == "calmrun"
    # the caller's span is linked from the decision on its request
    (requested,) = named["decide request"]
    caller_ref = f"{checkout.get_span_context().span_id:016x}"
    assert caller_ref in [r["spanID"] for r in requested["references"] if r["refType"] == "FOLLOWS_FROM"]


async def test_tracing_off_writes_no_header_and_makes_no_span(
    broker: str, prefix: str, started: list[Worker | PoolExecutor]
) -> None:
    settings = traced(broker, prefix, None, task_records=True)  # classify runs here: its record, checked
    wf = refund_flow()
    agents = AgentRegistry({"classify": classify, "ship": ship})
    worker = Worker(settings, [wf], agents, ModelRegistry(settings.models))
    executor = PoolExecutor(settings, [wf], "gpu", agents, ModelRegistry(settings.models))
    assert worker.tracing is NO_TRACING and executor.tracing is NO_TRACING
    assert worker.attempts.models is not None and type(worker.attempts.models) is ModelRegistry
    started.append(worker)
    await worker.start()
    await ready(worker)
    async with Client(settings) as client:
        await client.submit(RunRequest(workflow="refund", input={"n": 1, "text": "x"}))
        await until(lambda: worker.stats.tasks_started >= 1, 60, "the first attempt")
    records: list[Any] = []

    async def committed() -> bool:  # an early start runs the attempt before its task's decision commits
        records[:] = await read_raw(broker, f"{prefix}.step.refund.classify")
        return bool(records)

    await until(committed, 60, "the task record, committed")
    assert records and all(TRACEPARENT not in dict(r.headers) for r in records)

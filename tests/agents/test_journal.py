"""The journal without Kafka: the chain a reader sees, fencing by claims, parts, resume and the guard."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from calmrun.agents import ModelRegistry, StepContext
from calmrun.agents.journal import AttemptJournal, Call, Claim, Entry, MemoryJournal, chain, decode, split
from calmrun.errors import ErrorKind, NonDeterministicAgentError
from calmrun.workflow.events import StepTask

KEY = "r/s/run/1"


def _entry(inc: str, pos: int, payload: Any = None) -> Entry:
    call = Call(op="tool", name="t", label=f"tool t({pos})", digest=str(pos))
    return Entry(
        run_id="r",
        step="s",
        attempt=1,
        attempt_key=KEY,
        incarnation=inc,
        position=pos,
        call=call,
        payload=payload,
    )


def _claim(inc: str, base: int) -> Claim:
    return Claim(run_id="r", attempt_key=KEY, incarnation=inc, base=base)


def test_a_claim_fences_the_previous_incarnation() -> None:
    log = [
        _claim("a", 0),
        _entry("a", 0),
        _entry("a", 1),
        _claim("b", 2),  # b read 2 entries and continues
        _entry("a", 2),  # a zombie's late entry: never the attempt's
        _entry("b", 2),
        _entry("b", 3),
    ]
    got = chain(log, KEY)
    assert [(e.incarnation, e.position) for e in got] == [("a", 0), ("a", 1), ("b", 2), ("b", 3)]


def test_a_claim_cuts_what_its_incarnation_did_not_read() -> None:
    log = [_claim("a", 0), _entry("a", 0), _entry("a", 1), _claim("b", 1), _entry("b", 1)]
    assert [(e.incarnation, e.position) for e in chain(log, KEY)] == [("a", 0), ("b", 1)]


def test_an_entry_over_the_limit_is_written_in_parts_and_read_whole() -> None:
    big = _entry("a", 0, payload="x" * 50_000 + json.dumps({"q": 'quote " and \\ slash'}) * 100)
    blobs = split(big, 8192)
    assert len(blobs) > 6 and all(len(b) <= 8192 for b in blobs)
    got = chain([_claim("a", 0), *(decode(b) for b in blobs)], KEY)
    assert got == [big]


def _task(attempt: int = 1) -> StepTask:
    return StepTask(
        run_id="r", workflow="w", version="1", step="s", attempt=attempt, agent="a", model="m",
        issued_ms=0, timeout_s=30,
    )  # fmt: skip


def _agent(region: str = "eu") -> tuple[Agent[None, str], dict[str, int], ModelRegistry]:
    calls = {"model": 0, "tool": 0}

    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        n = sum(1 for m in messages if isinstance(m, ModelResponse))
        if n < 3:
            return ModelResponse(parts=[ToolCallPart("lookup", {"order": n})])
        return ModelResponse(parts=[TextPart("done")])

    agent: Agent[None, str] = Agent(name="looker")

    @agent.tool_plain
    def lookup(order: int, region: str = region) -> str:
        calls["tool"] += 1
        return f"order {order} in {region}"

    return agent, calls, ModelRegistry({}, overrides={"m": FunctionModel(script)})


async def _run(agent: Agent[None, str], models: ModelRegistry, store: MemoryJournal) -> StepContext:
    ctx = StepContext.for_task(_task(), models)
    ctx.journal = AttemptJournal(store, run_id="r", step="s", attempt=1, attempt_key=_task().idempotency_key)
    await ctx.run(agent, "go")
    return ctx


async def test_a_resumed_attempt_answers_from_its_journal_and_continues_live() -> None:
    agent, calls, models = _agent()
    store = MemoryJournal()
    first = await _run(agent, models, store)
    assert calls == {"model": 4, "tool": 3} and first.journal is not None and first.journal.executed == 7
    again = await _run(agent, models, store)  # the whole attempt again: nothing runs
    assert calls == {"model": 4, "tool": 3} and again.journal is not None and again.journal.replayed == 7
    assert (again.tokens_in, again.tokens_out, again.requests) == (first.tokens_in, first.tokens_out, 4)
    # a crash after the third unit: the first three are answered, the rest runs
    partial = MemoryJournal(store.records[:3])  # three entries, the first with the claim
    resumed = await _run(agent, models, partial)
    assert resumed.journal is not None and (resumed.journal.replayed, resumed.journal.executed) == (3, 4)
    assert calls == {"model": 4 + 2, "tool": 3 + 2}


async def test_another_tool_argument_on_resume_is_a_non_determinism_error() -> None:
    agent, _, models = _agent(region="eu")
    store = MemoryJournal()
    await _run(agent, models, store)
    changed, _, _ = _agent(region="us")  # the new code's default makes the recorded call's arguments differ
    with pytest.raises(NonDeterministicAgentError) as info:
        await _run(changed, models, store)
    err = info.value
    assert err.position == 1 and err.kind == ErrorKind.NON_DETERMINISTIC_AGENT and err.retriable
    assert '"region": "eu"' in err.recorded and '"region": "us"' in err.made
    assert "position 1" in str(err)


def test_the_run_view_shows_each_journaled_request_and_redacts_tool_arguments_for_viewers() -> None:
    from calmrun.ui.views import run_view

    entries = [_entry("a", 0), _entry("a", 1)]
    entries[0].call.op, entries[0].call.label, entries[0].model = "model", "model request to smart", "gpt-x"
    entries[0].usage.input_tokens, entries[0].latency_ms, entries[0].at_ms = 40, 12.5, 10_000
    operator = run_view(None, [], [], redact=False, entries=entries)["requests"]
    assert [(r["position"], r["op"], r["label"]) for r in operator] == [
        (0, "model", "model request to smart"),
        (1, "tool", "tool t(1)"),
    ]
    assert operator[0]["start_ms"] == 10_000 - 12 and operator[0]["tokens_in"] == 40
    viewer = run_view(None, [], [], redact=True, entries=entries)["requests"]
    assert viewer[1]["label"] == "tool t"


async def test_another_model_on_resume_is_a_non_determinism_error() -> None:
    agent, _, models = _agent()
    store = MemoryJournal()
    await _run(agent, models, store)
    ctx = StepContext.for_task(_task(), models)
    ctx.journal = AttemptJournal(store, run_id="r", step="s", attempt=1, attempt_key=_task().idempotency_key)
    other = FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("done")]), model_name="other")
    with pytest.raises(NonDeterministicAgentError) as info:
        await ctx.run(agent, "go", model=other)  # the agent code now picks its own model
    assert info.value.position == 0
    assert info.value.recorded == "model request to m" and info.value.made == "model request to other"

"""The agent runtime without Kafka: registries, the step context, the executor, and the triage example."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelConnectionError, ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.output import NativeOutput, PromptedOutput, ToolOutput

from calmrun.agents import AGENT_TIMEOUT, AgentRegistry, ModelRegistry, StepContext, execute
from calmrun.errors import (
    ConfigError,
    InvalidInputError,
    InvalidOutputError,
    ProviderError,
    UnknownAgentError,
    UnknownModelError,
)
from calmrun.settings import ModelAlias, load_settings
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequested, StepResult, StepTask
from calmrun.workflow.state import RunState
from examples.triage import agents as triage

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triage"
SECRET = "sk-test-DO-NOT-LEAK-1234567890"


class Question(BaseModel):
    text: str
    n: int = 1


class Answer(BaseModel):
    words: list[str]
    n: int


async def echo_words(ctx: StepContext, q: Question) -> Answer:
    ctx.count_api_call(2)
    return Answer(words=q.text.split(), n=q.n)


async def returns_bad_output(ctx: StepContext, q: Question) -> Answer:
    return {"words": "not a list"}  # type: ignore[return-value]


async def returns_dict(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return {"got": inp, "when": Decimal("1.50")}


async def raises(ctx: StepContext, q: Question) -> Answer:
    raise RuntimeError("downstream exploded")


def _task(
    agent: str,
    payload: dict[str, Any],
    *,
    model: str | None = None,
    timeout_s: float = 5.0,
    issued_ms: int = 1_000,
) -> StepTask:
    return StepTask(
        run_id="run-1",
        workflow="wf",
        version="1",
        step="s",
        attempt=1,
        agent=agent,
        model=model,
        input=payload,
        issued_ms=issued_ms,
        timeout_s=timeout_s,
    )


def _clock(start: int = 1_250) -> Any:
    t = [start]

    def now() -> int:
        t[0] += 10
        return t[0]

    return now


def _ctx(models: ModelRegistry | None = None, alias: str | None = None) -> StepContext:
    return StepContext.for_task(_task("x", {}, model=alias), models or ModelRegistry({}))


@pytest.fixture
def registry() -> AgentRegistry:
    reg = AgentRegistry()
    reg.register("echo", echo_words)
    reg.register("bad_output", returns_bad_output)
    reg.register("raises", raises)
    return reg


@pytest.fixture
def triage_models() -> ModelRegistry:
    return ModelRegistry(load_settings(EXAMPLE / "models.yaml").models)


# -- agent registry ------------------------------------------------------------------------------------


def test_registry_resolves_names_and_module_attr(registry: AgentRegistry) -> None:
    spec = registry.resolve("echo")
    assert spec.input_model is Question and spec.output_model is Answer
    imported = registry.resolve("tests.agents.test_agents:echo_words")
    assert imported.target is echo_words
    assert registry.resolve("tests.agents.test_agents:echo_words") is imported  # cached
    agent_spec = registry.resolve("examples.triage.agents:classify")
    assert agent_spec.input_model is None and agent_spec.output_model is triage.Classification
    plain = registry.resolve("tests.agents.test_agents:returns_dict")
    assert plain.input_model is None and plain.output_model is None


@pytest.mark.parametrize("ref", ["nope", "no_such_module_xyz:fn", "examples.triage.agents:missing", "a:"])
def test_unknown_agent_names_ref_and_registered(registry: AgentRegistry, ref: str) -> None:
    with pytest.raises(UnknownAgentError) as info:
        registry.resolve(ref)
    assert not info.value.retriable
    assert repr(ref) in str(info.value)
    assert "echo" in str(info.value) and "raises" in str(info.value)


def test_register_rejects_non_agents() -> None:
    def sync_fn(ctx: StepContext, q: Question) -> Answer:
        raise AssertionError

    async def one_arg(q: Question) -> Answer:
        raise AssertionError

    async def bad_hint(ctx: StepContext, q: int) -> Answer:
        raise AssertionError

    reg = AgentRegistry()
    for fn in (sync_fn, one_arg, bad_hint):
        with pytest.raises(ConfigError):
            reg.register(fn.__name__, fn)  # type: ignore[arg-type]


# -- agent calls -----------------------------------------------------------------------------------------


async def test_function_agent_round_trip(registry: AgentRegistry) -> None:
    ctx = _ctx()
    out = await registry.resolve("echo").call(ctx, {"text": "hello big world", "n": 3})
    assert out == {"words": ["hello", "big", "world"], "n": 3}
    assert ctx.api_calls == 2


async def test_dict_agent_output_is_json_able(registry: AgentRegistry) -> None:
    out = await registry.resolve("tests.agents.test_agents:returns_dict").call(_ctx(), {"a": 1})
    assert out == {"got": {"a": 1}, "when": "1.50"}
    json.dumps(out)


async def test_invalid_input_is_not_retriable(registry: AgentRegistry) -> None:
    with pytest.raises(InvalidInputError) as info:
        await registry.resolve("echo").call(_ctx(), {"n": "many"})
    assert not info.value.retriable
    result = await execute(_task("echo", {"n": "many"}), registry, ModelRegistry({}), now_ms=_clock())
    assert result.error_type == "InvalidInputError" and result.retriable is False
    assert result.error is not None and "text" in result.error


async def test_invalid_output_is_retriable(registry: AgentRegistry) -> None:
    with pytest.raises(InvalidOutputError) as info:
        await registry.resolve("bad_output").call(_ctx(), {"text": "x"})
    assert info.value.retriable
    result = await execute(_task("bad_output", {"text": "x"}), registry, ModelRegistry({}), now_ms=_clock())
    assert result.error_type == "InvalidOutputError" and result.retriable is True


# -- executor -----------------------------------------------------------------------------------------


async def test_execute_success_reports_output_and_cost(registry: AgentRegistry) -> None:
    result = await execute(
        _task("echo", {"text": "a b"}, issued_ms=1_000), registry, ModelRegistry({}), now_ms=_clock(1_250)
    )
    assert result.ok and result.output == {"words": ["a", "b"], "n": 1}
    assert (result.run_id, result.step, result.attempt, result.kind) == ("run-1", "s", 1, "run")
    assert result.cost.queue_wait_ms == 260  # first now_ms() (1260) - issued_ms
    assert result.at_ms == 1_270  # now_ms() at the end
    assert result.cost.api_calls == 2 and result.cost.latency_ms >= 0


def _scripted_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"words": ["x", "y"], "n": 2})])


def _never_valid(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"words": ["x"]})])


answer_agent = Agent(output_type=Answer, instructions="Answer with words.")


async def test_pydantic_ai_agent_records_tokens(registry: AgentRegistry) -> None:
    models = ModelRegistry({"m": ModelAlias(model="function:tests.agents.test_agents:_scripted_answer")})
    task = _task("tests.agents.test_agents:answer_agent", {"text": "two words"}, model="m")
    result = await execute(task, registry, models, now_ms=_clock())
    assert result.ok, result.error
    assert result.output == {"words": ["x", "y"], "n": 2}
    assert result.cost.tokens_in > 0 and result.cost.tokens_out > 0 and result.cost.requests >= 1
    assert result.cost.model == "m"


async def test_failed_model_run_still_reports_usage(registry: AgentRegistry) -> None:
    models = ModelRegistry({"m": ModelAlias(model="function:tests.agents.test_agents:_never_valid")})
    task = _task("tests.agents.test_agents:answer_agent", {"text": "x"}, model="m")
    result = await execute(task, registry, models, now_ms=_clock())
    assert result.error_type == "InvalidOutputError" and result.retriable
    assert result.cost.requests >= 2 and result.cost.tokens_in > 0 and result.cost.tokens_out > 0


async def test_agent_without_model_alias_fails_not_retriable(registry: AgentRegistry) -> None:
    result = await execute(
        _task("tests.agents.test_agents:answer_agent", {}), registry, ModelRegistry({}), now_ms=_clock()
    )
    assert result.error_type == "ConfigError" and not result.retriable


async def test_unknown_alias_fails_not_retriable(registry: AgentRegistry) -> None:
    models = ModelRegistry({"fast": ModelAlias(model="test")})
    result = await execute(
        _task("tests.agents.test_agents:answer_agent", {}, model="huge"), registry, models, now_ms=_clock()
    )
    assert result.error_type == "UnknownModelError" and not result.retriable
    assert result.error is not None and "fast" in result.error


def _http_429(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(429, "m", body={"error": "slow down"})


def _http_400(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(400, "m", body={"error": "bad request"})


def _conn_refused(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelConnectionError("m", "connection refused", phase="connect")


@pytest.mark.parametrize(
    ("fn", "status", "retriable"),
    [
        ("_http_429", 429, True),
        ("_http_400", 400, False),
        ("_conn_refused", None, True),
    ],
)
async def test_provider_errors(registry: AgentRegistry, fn: str, status: int | None, retriable: bool) -> None:
    models = ModelRegistry({"m": ModelAlias(model=f"function:tests.agents.test_agents:{fn}")})
    ctx = StepContext.for_task(_task("x", {}, model="m"), models)
    with pytest.raises(ProviderError) as info:
        await registry.resolve("tests.agents.test_agents:answer_agent").call(ctx, {"text": "x"})
    assert info.value.status == status and info.value.retriable is retriable
    assert info.value.provider == "function"
    result = await execute(
        _task("tests.agents.test_agents:answer_agent", {}, model="m"), registry, models, now_ms=_clock()
    )
    assert result.error_type == "ProviderError" and result.retriable is retriable


async def test_agent_exception_is_retriable_result(
    registry: AgentRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="calmrun.agents"):
        result = await execute(_task("raises", {"text": "x"}), registry, ModelRegistry({}), now_ms=_clock())
    assert result.error_type == "RuntimeError" and result.error == "downstream exploded"
    assert result.retriable is True and result.output is None
    assert any(getattr(r, "run_id", None) == "run-1" for r in caplog.records)


async def test_hung_agent_times_out_and_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def hangs(ctx: StepContext, q: Question) -> Answer:
        ctx.count_api_call()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    reg = AgentRegistry({"hangs": hangs})
    result = await execute(
        _task("hangs", {"text": "x"}, timeout_s=0.2), reg, ModelRegistry({}), now_ms=_clock()
    )
    assert result.error_type == AGENT_TIMEOUT and result.retriable is True
    assert cancelled.is_set()
    assert result.cost.api_calls == 1  # work done before the timeout is still reported


async def test_agent_raising_its_own_timeout_error_is_not_agent_timeout() -> None:
    async def own_timeout(ctx: StepContext, q: Question) -> Answer:
        raise TimeoutError("the payments API timed out")

    reg = AgentRegistry({"t": own_timeout})
    result = await execute(_task("t", {"text": "x"}), reg, ModelRegistry({}), now_ms=_clock())
    assert result.error_type == "TimeoutError" and result.retriable


async def test_cancellation_propagates() -> None:
    started = asyncio.Event()

    async def waits(ctx: StepContext, q: Question) -> Answer:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    reg = AgentRegistry({"waits": waits})
    job = asyncio.create_task(execute(_task("waits", {"text": "x"}), reg, ModelRegistry({}), now_ms=_clock()))
    await started.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job


# -- model registry -----------------------------------------------------------------------------------


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("resolving a model must not touch the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_model_registry_resolves_test_function_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    models = ModelRegistry(
        {
            "t": ModelAlias(model="test"),
            "f": ModelAlias(model="function:examples.triage.scripted:fast"),
            "o": ModelAlias(
                model="openai:gpt-4o-mini",
                base_url="http://127.0.0.1:9/v1",
                api_key=SecretStr(SECRET),
                temperature=0.1,
                max_tokens=50,
                timeout_s=7,
                output_mode="native",
            ),
        }
    )
    assert isinstance(models.resolve("t"), TestModel)
    fn = models.resolve("f")
    assert isinstance(fn, FunctionModel) and fn.function is not None and fn.function.__name__ == "fast"
    openai = models.resolve("o")
    assert isinstance(openai, OpenAIChatModel)
    assert openai.model_name == "gpt-4o-mini" and openai.base_url.startswith("http://127.0.0.1:9/v1")
    assert models.resolve("o") is openai  # cached
    assert models.model_settings("o") == {"temperature": 0.1, "max_tokens": 50, "timeout": 7}
    assert models.model_settings("t") == {}
    for text in (models.describe("o"), repr(models), repr(openai), repr(models.config("o"))):
        assert SECRET not in text
    assert "api_key=<set>" in models.describe("o") and "gpt-4o-mini" in models.describe("o")


def test_describe_hides_credentials_in_base_url() -> None:
    models = ModelRegistry({"o": ModelAlias(model="openai:x", base_url="https://user:hunter2@llm.local/v1")})
    assert "hunter2" not in models.describe("o") and "llm.local" in models.describe("o")


def test_unknown_alias_names_known_aliases() -> None:
    models = ModelRegistry({"fast": ModelAlias(model="test"), "smart": ModelAlias(model="test")})
    with pytest.raises(UnknownModelError) as info:
        models.resolve("huge")
    assert not info.value.retriable
    assert "'huge'" in str(info.value) and "fast" in str(info.value) and "smart" in str(info.value)


def test_bad_function_path_is_config_error() -> None:
    models = ModelRegistry({"f": ModelAlias(model="function:examples.triage.scripted:nope")})
    with pytest.raises(ConfigError, match="'f'"):
        models.resolve("f")


def test_output_modes() -> None:
    models = ModelRegistry(
        {m: ModelAlias(model="test", output_mode=m) for m in ("tool", "native", "prompted")}
        | {"plain": ModelAlias(model="test")}
    )
    assert isinstance(models.output_type_for("tool", Answer), ToolOutput)
    assert isinstance(models.output_type_for("native", Answer), NativeOutput)
    assert isinstance(models.output_type_for("prompted", Answer), PromptedOutput)
    assert models.output_type_for("plain", Answer) is Answer


@pytest.mark.parametrize("mode", ["tool", "native", "prompted"])
async def test_scripted_models_answer_every_output_mode(mode: str) -> None:
    models = ModelRegistry(
        {"fast": ModelAlias(model="function:examples.triage.scripted:fast", output_mode=mode)}
    )
    ctx = StepContext.for_task(_task("x", {}, model="fast"), models)
    ticket = {"ticket_id": "T-1", "subject": "Refund", "body": "Please refund ORD-12345 ($10.00)"}
    result = await ctx.run(triage.classify, json.dumps(ticket))
    assert result.output.category == "billing"
    assert ctx.requests >= 1


def test_step_context_model_needs_alias() -> None:
    with pytest.raises(ConfigError, match="model alias"):
        _ctx().model()


# -- the triage example -------------------------------------------------------------------------------


def _tickets() -> dict[str, dict[str, Any]]:
    lines = (EXAMPLE / "tickets.jsonl").read_text().splitlines()
    return {t["ticket_id"]: t for t in map(json.loads, lines)}


REFUND, ESCALATE, PLAIN = "T-1001", "T-1004", "T-1002"


async def test_example_agents_with_scripted_models(triage_models: ModelRegistry) -> None:
    reg = AgentRegistry()
    ticket = _tickets()[REFUND]

    def ctx(alias: str | None) -> StepContext:
        return StepContext.for_task(_task("x", {}, model=alias), triage_models)

    c = ctx("fast")
    cls = await reg.resolve("examples.triage.agents:classify").call(c, ticket)
    assert cls["category"] == "billing" and c.tokens_in > 0
    sen = await reg.resolve("examples.triage.agents:sentiment").call(ctx("fast"), ticket)
    assert sen["tone"] in ("positive", "neutral") and sen["legal_threat"] is False
    e = ctx(None)
    ext = await reg.resolve("examples.triage.agents:extract").call(e, ticket)
    assert ext == {"order_id": "ORD-10492", "amount": "49.99", "order_found": True}
    assert e.api_calls == 1
    d = ctx("smart")
    dec = await reg.resolve("examples.triage.agents:decide").call(
        d, {"ticket": ticket, "classification": cls, "extraction": ext, "sentiment": sen}
    )
    assert dec["action"] == "refund" and dec["refund_amount"] == "49.99" and d.requests >= 1
    req = {"ticket_id": REFUND, "order_id": "ORD-10492", "amount": "49.99"}
    receipt = await reg.resolve("examples.triage.agents:refund").call(ctx(None), req)
    reversal = await reg.resolve("examples.triage.agents:reverse_refund").call(ctx(None), req)
    assert receipt["refund_id"] == reversal["refund_id"] and reversal["status"] == "reversed"


async def _run_triage(models: ModelRegistry, ticket: dict[str, Any]) -> tuple[RunState, list[StepResult]]:
    """Drive the example workflow in process: the pure decider plus the executor, no Kafka."""
    wf = load_workflow(EXAMPLE / "workflow.yaml")
    reg = AgentRegistry()
    now = _clock(10_000)
    d = decide(
        wf,
        None,
        RunRequested(run_id=f"run-{ticket['ticket_id']}", workflow=wf.name, input=ticket, at_ms=now()),
    )
    state, pending, results = d.state, list(d.tasks), []
    while pending:
        batch, pending = pending, []
        outcomes = await asyncio.gather(*(execute(t, reg, models, now_ms=now) for t in batch))
        for result in outcomes:
            results.append(result)
            d = decide(wf, state, result)
            state = d.state
            pending += d.tasks
    assert state is not None
    return state, results


@pytest.mark.parametrize(
    ("ticket_id", "outcome", "last_step"),
    [
        (REFUND, "refunded", "notify"),
        (ESCALATE, "escalated", "escalate"),
        (PLAIN, "approved", "approve"),
        ("T-1009", "escalated", "escalate"),  # refund above the limit goes to a human
        ("T-1008", "escalated", "escalate"),  # refund without an order
    ],
)
async def test_example_routes(
    triage_models: ModelRegistry, ticket_id: str, outcome: str, last_step: str
) -> None:
    state, results = await _run_triage(triage_models, _tickets()[ticket_id])
    assert all(r.ok for r in results), [(r.step, r.error) for r in results if not r.ok]
    assert state.status == "completed" and state.outcome == outcome, state
    assert state.steps[last_step].status == "succeeded"
    ran = {r.step for r in results}
    assert {"classify", "extract", "sentiment", "decide"} <= ran
    decide_cost = next(r.cost for r in results if r.step == "decide")
    assert decide_cost.model == "smart" and decide_cost.tokens_in > 0
    if outcome == "refunded":
        assert state.steps["refund"].output is not None
        assert state.steps["refund"].output["amount"] == "49.99"
    if ticket_id == ESCALATE:
        escalation = state.steps["escalate"].output
        assert escalation is not None and escalation["queue"] == "legal" and escalation["paged"] is True


async def test_every_sample_ticket_completes(triage_models: ModelRegistry) -> None:
    outcomes = []
    for ticket in _tickets().values():
        state, results = await _run_triage(triage_models, ticket)
        assert state.status == "completed", (ticket["ticket_id"], [(r.step, r.error) for r in results])
        outcomes.append(state.outcome)
    assert {"approved", "escalated", "refunded"} == set(outcomes)

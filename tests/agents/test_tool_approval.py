"""A tool that needs approval (``requires_approval``) pauses a durable agent; the answer resumes it.

In process, through ``agents.executor.execute`` with a journal in memory and a scripted ``FunctionModel``:
the paused attempt's result names the tool call; the same attempt run again with the answer answers its
recorded model request from the journal, then runs the tool (approved) or gives the model the rejection as
the tool's answer. The broker and restart test is ``test_tool_approval_restart.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.agents.executor import execute
from calmrun.agents.journal import MemoryJournal
from calmrun.errors import ErrorKind
from calmrun.replay.agents import replay_agents
from calmrun.workflow.events import RunEvent, StepTask


def _setup() -> tuple[AgentRegistry, ModelRegistry, dict[str, Any]]:
    seen: dict[str, Any] = {"model": 0, "refunds": [], "returns": []}

    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen["model"] += 1
        returns = [
            p
            for m in messages
            if isinstance(m, ModelRequest)
            for p in m.parts
            if isinstance(p, ToolReturnPart)
        ]
        if returns:
            seen["returns"].append(str(returns[-1].content))
            return ModelResponse(parts=[TextPart(f"done: {returns[-1].content}")])
        return ModelResponse(parts=[ToolCallPart("refund", {"order": 7}, tool_call_id="call-1")])

    agent: Agent[None, str] = Agent(name="refunder")

    @agent.tool_plain(requires_approval=True)
    def refund(order: int) -> str:
        seen["refunds"].append(order)
        return f"refunded {order}"

    return (
        AgentRegistry({"refunder": agent}),
        ModelRegistry({}, overrides={"m": FunctionModel(script)}),
        seen,
    )


def _task(approvals: dict[str, Any] | None = None) -> StepTask:
    return StepTask(
        run_id="r", workflow="w", version="1", step="pay", attempt=1, agent="refunder", model="m",
        issued_ms=0, timeout_s=30, approvals=approvals,
    )  # fmt: skip


async def test_an_approval_runs_the_tool_once_and_no_model_request_again() -> None:
    agents, models, seen = _setup()
    store = MemoryJournal()
    paused = await execute(_task(), agents, models, now_ms=lambda: 1, journal=store)
    assert paused.error_type == ErrorKind.TOOL_APPROVAL_PENDING and not paused.retriable
    call = {"tool_call_id": "call-1", "tool": "refund", "args": {"order": 7}, "position": 1}
    assert paused.output == {"tool_approval": [call]} and paused.cost.requests == 1
    assert seen == {"model": 1, "refunds": [], "returns": []}
    # a copy of the paused attempt (a re-issue before the answer): it pauses again, from the journal
    again = await execute(_task(), agents, models, now_ms=lambda: 1, journal=store)
    assert again.output == paused.output and seen["model"] == 1
    answer = {"call-1": {"approved": True, "by": "alice", "comment": None, "billed": 1}}
    done = await execute(_task(answer), agents, models, now_ms=lambda: 2, journal=store)
    assert done.ok, done.error
    assert done.cost.requests == 1  # the request before the pause was reported by the pause's result
    assert done.output == {"output": "done: refunded 7"}
    assert seen == {"model": 2, "refunds": [7], "returns": ["refunded 7"]}
    # the whole attempt once more (a crash before its result committed): nothing runs again
    once_more = await execute(_task(answer), agents, models, now_ms=lambda: 3, journal=store)
    assert once_more.output == done.output and seen["model"] == 2 and seen["refunds"] == [7]
    assert once_more.cost.requests == 1


async def test_a_rejection_is_the_tools_answer_to_the_agent() -> None:
    agents, models, seen = _setup()
    store = MemoryJournal()
    await execute(_task(), agents, models, now_ms=lambda: 1, journal=store)
    answer = {"call-1": {"approved": False, "by": "bob", "comment": "not this order"}}
    done = await execute(_task(answer), agents, models, now_ms=lambda: 2, journal=store)
    assert done.ok, done.error
    assert seen["refunds"] == [] and seen["model"] == 2
    assert seen["returns"] == ["The tool call was rejected by bob: not this order"]
    assert done.output == {"output": "done: The tool call was rejected by bob: not this order"}


async def test_replay_without_a_model_converges_on_an_answered_pause() -> None:
    agents, models, seen = _setup()
    store = MemoryJournal()
    await execute(_task(), agents, models, now_ms=lambda: 1, journal=store)
    answer = {"call-1": {"approved": False, "by": "bob", "comment": "no", "billed": 1}}
    done = await execute(_task(answer), agents, models, now_ms=lambda: 2, journal=store)
    succeeded = RunEvent(
        run_id="r", seq=5, type="step.succeeded", at_ms=2, workflow="w", step="pay", attempt=1,
        data={"kind": "run", "output": done.output},
    )  # fmt: skip
    (verdict,) = await replay_agents(store.records, [succeeded], agents)
    assert verdict.verdict == "converged", verdict.reason
    assert verdict.model_requests == 0 and seen["model"] == 2

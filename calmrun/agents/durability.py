"""calmrun's durability capability for pydantic-ai: an agent's model requests and tool calls on Kafka.

``StepContext.run`` attaches :class:`CalmrunDurability` to every run of a pydantic-ai ``Agent`` inside a step
attempt, so any agent becomes durable without a change to its code. It is an engine built on the public
``pydantic_ai.durable_exec`` surface: a ``BaseDurabilityCapability`` whose backend
(``JournalCallableOperationBackend``) runs each durable unit through the attempt's :class:`AttemptJournal`:
a recorded unit is answered from the journal, a new one runs and is journaled before the agent continues.
Model requests, function and MCP tool calls and toolset listings are journaled; event-stream handling and
argument validation run in place (they have no effect outside the process). Tool calls run one at a time, so
positions do not depend on scheduling. Replayed units are kept out of traces and metrics
(``replay_scope``, ``record_durable_unit``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_ai.capabilities.abstract import WrapRunHandler
from pydantic_ai.durable_exec import (
    JSON_CODEC,
    BaseDurabilityCapability,
    DurabilityEngineSpec,
    DurableOperationBackend,
    DurableOperationId,
    JournalCallableOperationBackend,
    ModelRequestId,
    OperationConfigRole,
    ToolsetCallToolId,
    ToolsetGetInstructionsId,
    ToolsetGetToolsId,
    record_durable_unit,
    replay_scope,
)
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import AgentDepsT, RunContext
from pydantic_ai.usage import RunUsage
from pydantic_core import to_jsonable_python

from calmrun.agents.journal import AttemptJournal, Call, Op, Unit, Usage, digest

ENGINE = "calmrun"


@dataclass(frozen=True)
class _Config:
    """No per-unit configuration: a unit's retries are the step's attempts."""


class _NoConfig:
    def base(self, role: OperationConfigRole, *, operation_id: DurableOperationId) -> _Config:
        return _Config()

    def for_tool(
        self,
        role: OperationConfigRole,
        *,
        operation_id: DurableOperationId,
        tool: object | None,
        tool_name: str,
    ) -> _Config:
        return _Config()


class JournalBackend(JournalCallableOperationBackend[_Config]):
    """Runs each durable unit through the attempt's journal (see the module docstring)."""

    def __init__(
        self,
        journal: AttemptJournal,
        *,
        agent_name: str,
        default_model_id: str | None,
        model_label: str | None = None,
    ) -> None:
        super().__init__(agent_name=agent_name, default_model_id=default_model_id, config=_NoConfig())
        self.journal, self.model_label = journal, model_label

    async def execute(
        self,
        *,
        operation_id: DurableOperationId,
        name: str,
        body: Callable[[], Awaitable[object]],
        cache_key: tuple[object, ...],
        config: _Config,
    ) -> object:
        call, ctx = _call(operation_id, name, cache_key, self.model_label)
        if call is None:
            return await body()
        before = _tokens(ctx.usage) if ctx is not None else None

        def describe(payload: Any) -> Unit:
            if call.op == "model":
                return _model_unit(payload, cache_key)
            if ctx is not None and before is not None:  # a tool: the usage of agents it delegated to
                after = _tokens(ctx.usage)
                return Unit(usage=Usage(**{k: after[k] - before[k] for k in after}))
            return Unit()

        payload, entry, executed = await self.journal.unit(call, body, describe)
        if not executed and call.op != "model" and ctx is not None:
            u = entry.usage  # a delegated agent's usage counts again on resume, as it did live
            if u.input_tokens or u.output_tokens or u.requests:
                ctx.usage.incr(
                    RunUsage(input_tokens=u.input_tokens, output_tokens=u.output_tokens, requests=u.requests)
                )
        record_durable_unit(executed=executed)
        return payload


class CalmrunDurability(BaseDurabilityCapability[AgentDepsT]):
    """Makes an agent run durable on one step attempt's journal; ``StepContext.run`` attaches it.

    Args:
        journal: the attempt's journal session.
        models: the model instances the run may use, by alias (a ``Model`` cannot cross a journal, its alias
            does).
        name: the agent's name in operation names (default: the agent's ``name``, else ``agent``).
        model_label: what identifies the run's model in the journal (the step's alias; see ``_call``).
    """

    engine_spec = DurabilityEngineSpec(
        engine_name="calmrun",
        durable_unit_noun="journal entry",
        durable_unit_plural="journal entries",
        durable_container_noun="step attempt",
        codec=JSON_CODEC,
        wrapped_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        toolset_lifecycles={
            "function": "enter-always",
            "mcp": "enter-in-durable-unit",
            "dynamic": "enter-never",
        },
        journal_discovery=True,
        sequential_tools_in_durable_context=True,
        tool_config_key=None,
    )

    def __init__(
        self,
        journal: AttemptJournal,
        *,
        models: Mapping[str, Model] | None = None,
        name: str | None = None,
        model_label: str | None = None,
    ) -> None:
        super().__init__(models=models, name=name)
        self.journal, self.model_label = journal, model_label
        self._backend: JournalBackend | None = None

    def _check_bindable(self) -> None:
        if not self.name:
            self.name = "agent"

    def _bind_to_agent(self, agent: Any) -> None:
        if not self.name:
            self.name = agent.name or "agent"
        self._backend = JournalBackend(
            self.journal,
            agent_name=self.name,
            default_model_id=self.default_model_id,
            model_label=self.model_label,
        )
        super()._bind_to_agent(agent)

    @property
    def in_durable_context(self) -> bool:
        return True

    def get_durable_operation_backend(self) -> DurableOperationBackend[Any]:
        if self._backend is None:  # for_agent binds before any run
            self._backend = JournalBackend(
                self.journal,
                agent_name=self.name or "agent",
                default_model_id=None,
                model_label=self.model_label,
            )
        return self._backend

    async def wrap_run(self, ctx: RunContext[AgentDepsT], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        with replay_scope():
            return await super().wrap_run(ctx, handler=handler)


def _call(
    operation_id: DurableOperationId, name: str, key: tuple[object, ...], model_label: str | None
) -> tuple[Call | None, RunContext[Any] | None]:
    """The journal call of a unit and its run context; (None, None) for a unit that runs in place.

    A model request is identified by the model the step asked for (``model_label``: its alias, or the name
    of a model the agent code passed), never by the instance: a replay answers with a model that refuses.
    """
    op: Op
    if isinstance(operation_id, ModelRequestId):
        model = model_label or operation_id.model_id or operation_id.model_name
        call = Call(op="model", name=name, label=f"model request to {model}", digest=digest(name, model))
        return call, None
    if isinstance(operation_id, ToolsetCallToolId):
        tool, args, ctx = str(key[0]), key[1], key[2]
        op = "mcp" if operation_id.toolset_kind == "mcp" else "tool"
        shown = json.dumps(to_jsonable_python(args, fallback=repr), sort_keys=True)
        label = f"{op} {tool}({shown[:200]})"
        run_ctx = ctx if isinstance(ctx, RunContext) else None
        return Call(op=op, name=name, label=label, digest=digest(name, tool, args)), run_ctx
    if isinstance(operation_id, ToolsetGetToolsId | ToolsetGetInstructionsId):
        return Call(op="listing", name=name, label=f"listing {name}", digest=digest(name)), None
    return None, None


def _tokens(usage: RunUsage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "requests": usage.requests,
    }


def _model_unit(payload: Any, key: tuple[object, ...]) -> Unit:
    """The new messages (the last request, the response's parts) and usage of a model request's entry."""
    messages = key[1] if len(key) > 1 and isinstance(key[1], list) else []
    new = [to_jsonable_python(messages[-1], fallback=repr)] if messages else []
    usage = payload.get("usage", {}) if isinstance(payload, dict) else {}
    model = payload.get("model_name") if isinstance(payload, dict) else None
    return Unit(
        new_messages=new,
        usage=Usage(
            input_tokens=int(usage.get("input_tokens", 0) or 0),
            output_tokens=int(usage.get("output_tokens", 0) or 0),
            requests=1,
        ),
        model=model,
    )

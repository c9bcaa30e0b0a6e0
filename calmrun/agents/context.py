"""What an agent sees of its step attempt: identity, its model, a logger, and the usage it accumulates."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel
from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults, ToolDenied
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.models import Model
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.usage import RunUsage

from calmrun.agents.durability import CalmrunDurability
from calmrun.agents.journal import AttemptJournal
from calmrun.agents.models import ModelRegistry
from calmrun.costs.pricing import Pricing
from calmrun.errors import ConfigError, ToolApprovalPendingError
from calmrun.workflow.events import StepCost, StepTask

OutputT = TypeVar("OutputT")

_log = logging.getLogger("calmrun.agents")


@dataclass
class StepContext:
    """One attempt of one step, as an agent sees it.

    Pass ``idempotency_key`` to downstream APIs: it is stable per attempt, so a re-executed attempt (after a
    worker crash) is recognised there. Usage of every model run through :meth:`run` is added up here and
    reported in the step's cost, also when the attempt fails.
    """

    run_id: str
    workflow: str
    step: str
    attempt: int
    kind: Literal["run", "compensate"]
    tenant: str
    idempotency_key: str
    model_alias: str | None
    logger: logging.LoggerAdapter[logging.Logger]
    models: ModelRegistry = field(repr=False)
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    api_calls: int = 0
    api_calls_by_kind: dict[str, int] = field(default_factory=dict)
    journal: AttemptJournal | None = field(default=None, repr=False)
    """The attempt's agent journal: set, every pydantic-ai agent run through :meth:`run` is durable."""
    approvals: dict[str, Any] = field(default_factory=dict)
    """People's answers to tool calls of this attempt that needed approval: tool call ID -> answer."""

    @classmethod
    def for_task(
        cls, task: StepTask, models: ModelRegistry, logger: logging.Logger | None = None
    ) -> StepContext:
        """The context of ``task``; its logger adds ``run_id``, ``step`` and ``attempt`` to every record."""
        extra = {"run_id": task.run_id, "step": task.step, "attempt": task.attempt}
        return cls(
            run_id=task.run_id,
            workflow=task.workflow,
            step=task.step,
            attempt=task.attempt,
            kind=task.kind,
            tenant=task.tenant,
            idempotency_key=task.idempotency_key,
            model_alias=task.model,
            logger=logging.LoggerAdapter(logger or _log, extra),
            models=models,
            approvals=dict(task.approvals or {}),
        )

    def model(self) -> Model:
        """The pydantic-ai model of this step's alias.

        Raises:
            ConfigError: the step names no model alias.
            UnknownModelError: the alias is not configured.
        """
        if self.model_alias is None:
            raise ConfigError(
                f"step {self.step!r} of workflow {self.workflow!r} runs a model but names no model alias "
                f"(set `model:` on the step)"
            )
        return self.models.resolve(self.model_alias)

    def count_api_call(self, n: int = 1, kind: str = "api") -> None:
        """Count ``n`` downstream API calls for the step's cost.

        ``kind`` (``"payments"``, ``"ticketing"``...) selects the per-call price in ``prices.api_calls``;
        calls of a kind without a price are counted and cost nothing.
        """
        self.api_calls += n
        self.api_calls_by_kind[kind] = self.api_calls_by_kind.get(kind, 0) + n

    def add_usage(self, usage: RunUsage) -> None:
        """Add a pydantic-ai usage to this attempt's totals."""
        self.tokens_in += usage.input_tokens
        self.tokens_out += usage.output_tokens
        self.requests += usage.requests

    async def run(self, agent: Agent[Any, OutputT], prompt: str, **kw: Any) -> AgentRunResult[OutputT]:
        """Run ``agent`` on this step's model and model settings and record its usage.

        Keyword arguments go to ``agent.run``; a ``model`` given there wins over the step's, and
        ``model_settings`` given there are merged over the alias's. When the alias sets an ``output_mode`` and
        the agent's output type is a pydantic model, the output type is wrapped for that mode.

        The usage is counted even when the run raises (for example ``UnexpectedModelBehavior`` after the
        output retries are exhausted): pydantic-ai adds to the ``RunUsage`` passed in as it goes.
        """
        explicit = kw.get("model")  # a model the agent code chose, else the step's alias
        if "model" not in kw:
            kw["model"] = self.model()
        if self.model_alias is not None and self.model_alias in self.models:
            alias_settings = self.models.model_settings(self.model_alias)
            given = kw.get("model_settings")
            if given is None:
                kw["model_settings"] = alias_settings or None
            elif isinstance(given, dict):
                kw["model_settings"] = {**alias_settings, **given}
            out = agent.output_type
            if "output_type" not in kw and isinstance(out, type) and issubclass(out, BaseModel):
                wrapped = self.models.output_type_for(self.model_alias, out)
                if wrapped is not out:
                    kw["output_type"] = wrapped
        usage: RunUsage = kw.pop("usage", None) or RunUsage()
        before = (usage.input_tokens, usage.output_tokens, usage.requests)
        if self.journal is not None:
            model = kw.pop("model")
            label = self.model_alias if explicit is None else str(getattr(explicit, "model_name", explicit))
            # the model instance registered, each layer of it: pydantic-ai's instrumentation may re-wrap the
            # bare model inside a wrapper (tracing's InstrumentedModel), and a request must still be known
            registered = _layers(label or "step", model) if isinstance(model, Model) else None
            durable = CalmrunDurability[Any](
                self.journal, models=registered, name=agent.name or "agent", model_label=label
            )
            if isinstance(model, Model):
                agent = _with_model(agent, model)
            else:
                kw["model"] = model
            kw["capabilities"] = [*kw.get("capabilities", ()), durable]
            if _asks_approval(agent):  # only then: a custom output type is refused beside output validators
                kw["output_type"] = _deferrable(kw.get("output_type", agent.output_type))
        try:
            result = await agent.run(prompt, usage=usage, **kw)
            while self.journal is not None and isinstance(result.output, DeferredToolRequests):
                answers = self._answers(result.output)
                result = await agent.run(
                    message_history=result.all_messages(), deferred_tool_results=answers, usage=usage, **kw
                )
        finally:
            self.tokens_in += usage.input_tokens - before[0]
            self.tokens_out += usage.output_tokens - before[1]
            self.requests += usage.requests - before[2]
        return cast("AgentRunResult[OutputT]", result)

    def _answers(self, asked: DeferredToolRequests) -> DeferredToolResults:
        """The people's answers to the tool calls ``asked`` waits on.

        Raises:
            ToolApprovalPendingError: a call has no answer yet (the attempt pauses, the step waits).
            ConfigError: the agent deferred a call to be run outside it (only approvals are supported).
        """
        if asked.calls:
            names = ", ".join(c.tool_name for c in asked.calls)
            raise ConfigError(
                f"step {self.step!r}: the agent deferred tool calls to run outside it ({names}); calmrun "
                f"answers only tool calls that need approval (requires_approval)"
            )
        waiting = [c for c in asked.approvals if c.tool_call_id not in self.approvals]
        if waiting:
            raise ToolApprovalPendingError(
                self.step,
                [
                    {
                        "tool_call_id": c.tool_call_id,
                        "tool": c.tool_name,
                        "args": c.args_as_dict(),
                        "position": self.journal.position if self.journal is not None else 0,
                    }
                    for c in waiting
                ],
            )
        approvals: dict[str, bool | ToolDenied] = {}
        for c in asked.approvals:
            a = self.approvals[c.tool_call_id]
            if a.get("approved"):
                approvals[c.tool_call_id] = True
            else:
                why = f": {a['comment']}" if a.get("comment") else ""
                approvals[c.tool_call_id] = ToolDenied(f"The tool call was rejected by {a.get('by')}{why}")
        by = {c.tool_call_id: str(self.approvals[c.tool_call_id].get("by")) for c in asked.approvals}
        return DeferredToolResults(approvals=dict(approvals), answered_by=by)

    def unbill_replayed(self, billed: int) -> None:
        """Take out the usage of the journal's first ``billed`` entries: an earlier result of this same
        attempt (its pause on a tool call) reported them already."""
        if self.journal is None or billed <= 0:
            return
        for e in self.journal.entries:
            if e.position < billed:
                self.tokens_in = max(0, self.tokens_in - e.usage.input_tokens)
                self.tokens_out = max(0, self.tokens_out - e.usage.output_tokens)
                self.requests = max(0, self.requests - e.usage.requests)

    def cost(
        self,
        latency_ms: float,
        queue_wait_ms: float,
        pricing: Pricing | None = None,
        agent: str | None = None,
    ) -> StepCost:
        """This attempt's cost so far; without ``pricing``, ``cost_usd`` is 0 and ``price_source`` None;
        ``agent`` names the agent that ran it."""
        price = (
            pricing.price(self.model_alias, self.tokens_in, self.tokens_out, self.api_calls_by_kind)
            if pricing is not None
            else None
        )
        return StepCost(
            latency_ms=latency_ms,
            queue_wait_ms=queue_wait_ms,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            requests=self.requests,
            api_calls=self.api_calls,
            model=self.model_alias,
            agent=agent,
            cost_usd=price.usd if price is not None else Decimal(0),
            price_source=price.source if price is not None else None,
        )


def _layers(key: str, model: Model) -> dict[str, Model]:
    """``model`` and every model it wraps, by ``key``, ``key/1``, ``key/2``... (durability's ``models=``)."""
    layers: dict[str, Model] = {key: model}
    inner: Model | None = model.wrapped if isinstance(model, WrapperModel) else None
    while inner is not None:
        layers[f"{key}/{len(layers)}"] = inner
        inner = inner.wrapped if isinstance(inner, WrapperModel) else None
    return layers


def _asks_approval(agent: Agent[Any, Any]) -> bool:
    """Does one of ``agent``'s tools need a person's approval (pydantic-ai's ``requires_approval``)?"""
    for toolset in agent.toolsets:
        tools = getattr(toolset, "tools", None)
        if isinstance(tools, dict) and any(getattr(t, "requires_approval", False) for t in tools.values()):
            return True
    return False


def _deferrable(out: Any) -> Any:
    """An output type that may also end the run with ``DeferredToolRequests`` (a tool waits for approval)."""
    outs = list(out) if isinstance(out, list | tuple) else [out]
    return outs if DeferredToolRequests in outs else [*outs, DeferredToolRequests]


_copies: dict[tuple[int, int], tuple[Agent[Any, Any], Model, Agent[Any, Any]]] = {}
"""(id(agent), id(model)) -> (agent, model, the copy); holding both keeps their ids from being reused."""


def _with_model(agent: Agent[Any, OutputT], model: Model) -> Agent[Any, OutputT]:
    """``agent`` with ``model`` as its own model (a durable run's model must be the agent's, not the run's).

    A shallow copy per agent and model, cached: the agent given is shared by concurrent attempts and is
    never changed.
    """
    if agent.model is model:
        return agent
    found = _copies.get((id(agent), id(model)))
    if found is None:
        durable = copy.copy(agent)
        durable.model = model
        found = _copies[(id(agent), id(model))] = (agent, model, durable)
    return cast("Agent[Any, OutputT]", found[2])

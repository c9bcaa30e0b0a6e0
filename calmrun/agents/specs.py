"""Agents by name or ``module:attr``, with their typed input and output read from the code.

An agent is either an async function ``async def f(ctx: StepContext, inp: In) -> Out`` (``In``/``Out``
pydantic models, or ``dict[str, Any]``), or a ``pydantic_ai.Agent``, which gets its input as a JSON prompt and
whose ``output_type`` is its output model.
"""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_ai import Agent
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelServerError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)
from pydantic_core import PydanticSerializationError, to_jsonable_python

from calmrun.agents.context import StepContext
from calmrun.errors import (
    ConfigError,
    InvalidInputError,
    InvalidOutputError,
    ProviderError,
    UnknownAgentError,
)

AgentFn = Callable[[StepContext, Any], Awaitable[Any]]
"""``async def f(ctx: StepContext, inp: In) -> Out``."""

_RETRIABLE_CATEGORIES = (
    ModelConnectionError,
    ModelRateLimitError,
    ModelServerError,
    ModelUnavailableError,
    ModelRequestTimeout,
)


@dataclass(frozen=True)
class AgentSpec:
    """A resolved agent: what it is, what it takes and what it returns.

    Attributes:
        ref: the reference it was resolved from (a registered name or ``module:attr``).
        input_model: the pydantic model its input is validated against, or None for a plain dict.
        output_model: the pydantic model its output is validated against, or None for a plain dict.
    """

    ref: str
    target: AgentFn | Agent[Any, Any]
    input_model: type[BaseModel] | None
    output_model: type[BaseModel] | None

    async def call(self, ctx: StepContext, input: dict[str, Any]) -> dict[str, Any]:
        """Validate ``input``, run the agent, validate its output and return it as JSON-able data.

        Raises:
            InvalidInputError: the input does not validate (not retriable: the same input fails again).
            InvalidOutputError: the output does not validate, or the model's output retries ran out
                (retriable).
            ProviderError: the model provider failed; retriable for 408, 409, 429, 5xx and connection
                failures.
            Exception: whatever the agent raised otherwise.
        """
        arg: Any = dict(input)
        if self.input_model is not None:
            try:
                arg = self.input_model.model_validate(input)
            except ValidationError as exc:
                raise InvalidInputError(self.ref, _short(exc)) from exc
        try:
            if isinstance(self.target, Agent):
                prompt = json.dumps(to_jsonable_python(input), ensure_ascii=False)
                result = await ctx.run(self.target, prompt)
                raw: Any = result.output
            else:
                raw = await self.target(ctx, arg)
        except UnexpectedModelBehavior as exc:
            raise InvalidOutputError(self.ref, str(exc)) from exc
        except ModelAPIError as exc:
            raise _provider_error(ctx, exc) from exc
        return self._output(raw)

    def _output(self, raw: Any) -> dict[str, Any]:
        try:
            if self.output_model is not None:
                if not isinstance(raw, self.output_model):
                    data = raw.model_dump() if isinstance(raw, BaseModel) else raw
                    raw = self.output_model.model_validate(data)
                out = raw.model_dump(mode="json")
            elif isinstance(raw, BaseModel):
                out = raw.model_dump(mode="json")
            elif isinstance(self.target, Agent) and not isinstance(raw, dict):
                out = {"output": to_jsonable_python(raw)}  # e.g. a str output: carried under "output"
            else:
                out = to_jsonable_python(raw)
        except ValidationError as exc:
            raise InvalidOutputError(self.ref, _short(exc)) from exc
        except PydanticSerializationError as exc:
            raise InvalidOutputError(self.ref, f"not JSON-serialisable: {exc}") from exc
        if not isinstance(out, dict):
            raise InvalidOutputError(self.ref, f"expected an object, got {type(raw).__name__}")
        return typing.cast("dict[str, Any]", out)


class AgentRegistry:
    """Agents by name; a reference that is not registered is imported as ``module:attr``.

    Resolved specs are cached, so an agent's signature is inspected once per process.
    """

    def __init__(self, agents: Mapping[str, AgentFn | Agent[Any, Any]] | None = None) -> None:
        self._agents: dict[str, AgentFn | Agent[Any, Any]] = {}
        self._specs: dict[str, AgentSpec] = {}
        for name, fn in (agents or {}).items():
            self.register(name, fn)

    def __repr__(self) -> str:
        return f"AgentRegistry(names={self.names})"

    @property
    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._agents)

    def register(self, name: str, fn: AgentFn | Agent[Any, Any]) -> None:
        """Register ``fn`` (an async function agent or a pydantic-ai Agent) under ``name``.

        Raises:
            ConfigError: ``fn`` is not a valid agent (the message says why).
        """
        self._specs[name] = _spec(name, fn)
        self._agents[name] = fn

    def resolve(self, ref: str) -> AgentSpec:
        """The agent named ``ref``, or imported from ``ref`` = ``module:attr``.

        Raises:
            UnknownAgentError: neither registered nor importable (not retriable).
            ConfigError: found, but not a valid agent.
        """
        spec = self._specs.get(ref)
        if spec is not None:
            return spec
        module_name, sep, attr = ref.partition(":")
        if not sep or not module_name or not attr:
            raise UnknownAgentError(ref, self.names)
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownAgentError(ref, self.names, f"cannot import {module_name!r}: {exc}") from exc
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError as exc:
            raise UnknownAgentError(ref, self.names, f"{module_name!r} has no {attr!r}") from exc
        spec = _spec(ref, obj)
        self._specs[ref] = spec
        return spec


def _spec(ref: str, obj: Any) -> AgentSpec:
    if isinstance(obj, Agent):
        out = obj.output_type
        output_model = out if isinstance(out, type) and issubclass(out, BaseModel) else None
        return AgentSpec(ref=ref, target=obj, input_model=None, output_model=output_model)
    if not inspect.iscoroutinefunction(obj):
        raise ConfigError(
            f"agent {ref!r} must be an async function `async def f(ctx, inp) -> Out` or a pydantic_ai.Agent, "
            f"got {type(obj).__name__}"
        )
    params = list(inspect.signature(obj).parameters.values())
    if len(params) != 2:
        raise ConfigError(f"agent {ref!r} must take exactly (ctx, input); it takes {len(params)} parameters")
    try:
        hints = typing.get_type_hints(obj)
    except (NameError, TypeError, AttributeError) as exc:
        raise ConfigError(f"agent {ref!r}: cannot read its type hints: {exc}") from exc
    return AgentSpec(
        ref=ref,
        target=obj,
        input_model=_model_of(ref, "input", hints.get(params[1].name)),
        output_model=_model_of(ref, "output", hints.get("return")),
    )


def _model_of(ref: str, what: str, hint: Any) -> type[BaseModel] | None:
    if hint is None or hint is Any or hint is dict:
        return None
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint
    if typing.get_origin(hint) is dict:
        return None
    raise ConfigError(f"agent {ref!r}: its {what} must be a pydantic model or dict[str, Any], not {hint!r}")


def _provider_error(ctx: StepContext, exc: ModelAPIError) -> ProviderError:
    alias = ctx.model_alias
    provider = ctx.models.provider(alias) if alias is not None and alias in ctx.models else exc.model_name
    if isinstance(exc, ModelHTTPError):
        status: int | None = exc.status_code
        retriable = exc.status_code in (408, 409, 429) or exc.status_code >= 500
    else:
        status = None
        retriable = isinstance(exc, _RETRIABLE_CATEGORIES)
    return ProviderError(provider, status=status, retriable=retriable, detail=str(exc)[:500])


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:10]
    )

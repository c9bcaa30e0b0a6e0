"""What every step kind shares: its name, where the run goes after it, its retries and its budget.

A step is one of the kinds of ``calmrun.workflow.kinds`` (agent, approval, wait, ...): each kind is a
subclass of ``StepDef`` in its own module, holding its own fields, its own validation and what it does
when the run starts it, answers it or a timer finds it due. The transitions
(``calmrun.workflow.transitions``) call those methods and never ask which kind a step is.
"""

from __future__ import annotations

import operator
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

if TYPE_CHECKING:
    from calmrun.workflow.transitions import Transitions

NAME = r"^[a-z][a-z0-9_-]{0,62}$"
END = "end:"
DEFAULT_POOL = "default"
"""The pool of a step that names none: executed by the deciding workers themselves (eagerly)."""


class _Def(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(_Def):
    """Exponential backoff with deterministic jitter between attempts of one step."""

    max_attempts: int = Field(3, ge=1, le=100)
    initial_backoff_s: float = Field(0.5, ge=0)
    multiplier: float = Field(2.0, ge=1)
    max_backoff_s: float = Field(60.0, ge=0)
    jitter: float = Field(0.2, ge=0, le=1, description="+/- this fraction of the backoff")


_OPS: dict[str, Any] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
}


class Condition(_Def):
    """A test on one field of a step's output (``field`` is a dotted path)."""

    field: str
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "exists"] = "eq"
    value: Any = None

    def holds(self, output: Any) -> bool:
        """True when the condition holds for ``output``; a missing field holds only for ``ne``/``not_in``."""
        found, actual = lookup(output, self.field)
        if self.op == "exists":
            return found == bool(self.value if self.value is not None else True)
        if not found:
            return self.op in ("ne", "not_in")
        try:
            return bool(_OPS[self.op](actual, self.value))
        except TypeError:
            return False


def lookup(data: Any, path: str) -> tuple[bool, Any]:
    """Follow a dotted path through dicts (and list indexes); return (found, value)."""
    cur = data
    for part in path.split(".") if path else []:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


Target = str | list[str]
"""A step name, a list of step names (parallel fan-out), or ``end:<outcome>``."""


def targets(target: Target | None) -> list[str]:
    """A target as a list; no target means the run ends as ``completed``."""
    if target is None:
        return [f"{END}completed"]
    return [target] if isinstance(target, str) else list(target)


class Branch(_Def):
    """Go to ``goto`` when ``when`` holds for the step's output; branches are tried in order."""

    when: Condition
    goto: Target


class StepDef(_Def):
    """One step of a workflow, of one kind (``kind``; ``agent`` when absent).

    Built from YAML through the ``Step`` union of ``calmrun.workflow.kinds``; ``StepDef(**fields)`` in
    Python builds the kind the fields name, as the YAML would.

    Each kind says, in its own module: which fields it takes (``validate``), what starting or re-issuing
    the step does (``issue``), what a timer that finds the step due does (``due``), where else the run
    may go from it (``exits``), and, for the kinds that answer inputs of their own, ``answer``.
    """

    _kinds: ClassVar[dict[str, type[StepDef]]] = {}
    KIND: ClassVar[str] = ""

    name: str = Field(pattern=NAME)
    kind: str = "agent"
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="agent: an attempt's timeout (30 s); approval/wait: how long to wait (none: no limit)",
    )
    next: Target | None = None
    branches: list[Branch] = Field(default_factory=list)
    needs: list[str] = Field(default_factory=list, description="join: start only when all these succeeded")
    estimated_cost_usd: Decimal = Field(
        Decimal(0), ge=0, description="what an attempt may cost: the budget check stops a run before it"
    )
    pool: str = Field(
        DEFAULT_POOL,
        pattern=NAME,
        description="who executes this step: 'default' (the deciding workers) or the name of a pool of "
        "executors (`calmrun worker --pool NAME`), which read the step topic and answer on the results topic",
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            StepDef._kinds[cls.KIND] = cls

    def __new__(cls, *args: Any, **data: Any) -> StepDef:
        if cls is StepDef and data:
            kind = data.get("kind", "agent")
            if kind not in StepDef._kinds:
                raise ValueError(f"unknown step kind {kind!r}; kinds are {StepDef.kinds()}")
            return super().__new__(StepDef._kinds[kind])
        return super().__new__(cls)

    @field_validator("pool")
    @classmethod
    def _pool_named(cls, v: str) -> str:
        if v == "none":
            raise ValueError("'none' is not a pool name: `--pool none` means a worker that executes nothing")
        return v

    @model_validator(mode="before")
    @classmethod
    def _fields_of_kind(cls, data: Any) -> Any:
        """Fields of another kind are refused by name ("kind approval takes no agent"); an empty one
        (None, []) is dropped, as the flat definition of 0.3 accepted it."""
        if not isinstance(data, dict) or cls is StepDef:
            return data
        others = {f for k in StepDef._kinds.values() for f in k.model_fields} - set(cls.model_fields)
        given = {k for k, v in data.items() if k in others and v not in (None, [])}
        if data.get("pool", DEFAULT_POOL) != DEFAULT_POOL and not cls.executed():
            given.add("pool")  # an approval or a wait is decided, never executed
        if given:
            what = ", ".join(sorted(given))
            raise ValueError(f"step {data.get('name')!r}: kind {cls.KIND} takes no {what}")
        return {k: v for k, v in data.items() if k not in others}

    @model_serializer(mode="wrap")
    def _keep_kind(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A kind other than ``agent`` is written even where defaults are left out (``exclude_defaults``):
        without it the step would read back as an agent step."""
        data = handler(self)
        if isinstance(data, dict) and "kind" not in data and self.kind != "agent":
            data = {"kind": self.kind, **data}
        return data

    @staticmethod
    def kinds() -> list[str]:
        """The kinds known (each kind's module registers its subclass when it is imported)."""
        return sorted(StepDef._kinds)

    # -- what each kind says about itself ------------------------------------------------------------

    @classmethod
    def executed(cls) -> bool:
        """Does an executor run this kind (a task on a step topic), or is it decided alone?"""
        return False

    def exits(self) -> list[tuple[str, Target]]:
        """Where the run may go from this step besides ``next`` and ``branches``, by field (graph checks,
        limits)."""
        return []

    def back_edges(self) -> list[str]:
        """Earlier steps the run may go back to from this one (a loop's ``goto``): bounded, so not cycles."""
        return []

    def validate_in(self, steps: set[str]) -> None:
        """Checks that need the workflow (``steps``: its step names); raise ValueError naming the field."""

    @property
    def ladder(self) -> list[str | None]:
        """The model aliases attempts escalate along (one entry, possibly None, when there is no ladder)."""
        return [None]

    def compensation(self) -> str | None:
        """The agent that undoes this step when the run is quarantined or cancelled, if any."""
        return None

    def runs_agent(self) -> str | None:
        """The agent an attempt of this step runs, if it runs one (error messages name it)."""
        return None

    # -- what each kind does (called by the transitions) ---------------------------------------------

    def issue(self, t: Transitions, name: str) -> None:
        """Start the step's next attempt (first start, a retry that is due, a redrive)."""
        raise NotImplementedError(self.kind)

    def due(self, t: Transitions, name: str) -> None:
        """A timer found the step due (its ``due_ms`` or its ``deadline_ms`` passed)."""
        raise NotImplementedError(self.kind)

    def stopped(self, t: Transitions, name: str, reason: str) -> None:
        """The step was cancelled while active (the run stopped): release what it holds elsewhere."""

    def undo(self, t: Transitions, name: str) -> None:
        """Start the compensation of a succeeded step (only kinds whose ``compensation()`` is set)."""
        raise NotImplementedError(self.kind)

"""Workflow definitions: steps, transitions, branches, fan-out/join, retries and outcomes.

Written as YAML files or built as Python objects; both are validated by the same pydantic models, and
errors name the file, the step and the field.
"""

from __future__ import annotations

import hashlib
import json
import operator
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calmrun.errors import ConfigError

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


Escalation = Literal["invalid_output", "low_confidence", "exhausted"]
ESCALATIONS: tuple[Escalation, ...] = ("invalid_output", "low_confidence", "exhausted")

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


class CheapestMeeting(_Def):
    """Start on the first alias of the ladder (cheapest first) whose observed success rate meets a target.

    Walking the ladder: an alias with fewer than ``min_attempts`` attempts in the window is chosen (the
    ladder learns there); one meeting ``success_rate`` is chosen; one below it is passed over. When every
    alias was passed over, the step starts on the first rung, as a plain ladder does.
    """

    success_rate: float = Field(ge=0, le=1, description="accepted attempts / attempts, over the window")
    min_attempts: int = Field(20, ge=1, description="fewer attempts than this in the window: not known yet")
    window_s: int = Field(3600, ge=60, le=6 * 3600, description="how far back the figures reach (1m buckets)")


class Choose(_Def):
    """How a step with a model ladder picks its starting rung from the cost table's figures."""

    cheapest_meeting: CheapestMeeting


StepKind = Literal["agent", "approval", "wait"]
WAITING_KINDS: frozenset[str] = frozenset({"approval", "wait"})
AGENT_TIMEOUT_S = 30.0


class StepDef(_Def):
    """One step: which agent runs it, on which input, how it is retried, and where the run goes next.

    ``kind: approval`` and ``kind: wait`` run no agent: the run waits durably (no task, no thread) for an
    answer (``calmrun approve``/``reject``) or a named signal (``calmrun signal``), at most ``timeout_s``
    when it is set, then routes on the answer as on any step's output (see ``calmrun.workflow.people``).
    """

    name: str = Field(pattern=NAME)
    kind: StepKind = "agent"
    agent: str | None = Field(None, description="registered agent name or 'module:attr' (kind agent)")
    model: str | None = Field(None, description="model alias from configuration")
    input: dict[str, str] | None = Field(
        None, description="argument -> path: 'input.x' (run input), 'steps.<step>.x' (earlier output)"
    )
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="agent: an attempt's timeout (30 s); approval/wait: how long to wait (none: no limit)",
    )
    compensate: str | None = Field(
        None, description="agent that undoes this step when the run is quarantined"
    )
    next: Target | None = None
    branches: list[Branch] = Field(default_factory=list)
    needs: list[str] = Field(default_factory=list, description="join: start only when all these succeeded")
    models: list[str] = Field(
        default_factory=list, description="model aliases, cheapest first: the decider escalates along them"
    )
    escalate_on: list[Escalation] = Field(
        default_factory=lambda: list(ESCALATIONS),
        description="invalid_output: at once; low_confidence: output field below min_confidence; "
        "exhausted: after the retry policy gave up on a model",
    )
    confidence_field: str | None = Field(None, description="output field holding the agent's confidence")
    min_confidence: float | None = None
    estimated_cost_usd: Decimal = Field(
        Decimal(0), ge=0, description="what an attempt may cost: the budget check stops a run before it"
    )
    choose: Choose | None = Field(
        None, description="pick the starting rung of `models` from observed success rates (the planner)"
    )
    pool: str = Field(
        DEFAULT_POOL,
        pattern=NAME,
        description="who executes this step: 'default' (the deciding workers) or the name of a pool of "
        "executors (`calmrun worker --pool NAME`), which read the step topic and answer on the results topic",
    )

    @field_validator("pool")
    @classmethod
    def _pool_named(cls, v: str) -> str:
        if v == "none":
            raise ValueError("'none' is not a pool name: `--pool none` means a worker that executes nothing")
        return v

    approvers: list[str] = Field(default_factory=list, description="approval: who may answer (empty: anyone)")
    signal: str | None = Field(None, description="wait: the name of the signal the step waits for")
    on_timeout: Target | None = Field(
        None,
        description="approval/wait: where the run goes when timeout_s passes unanswered "
        "(none: the step fails and the run is quarantined)",
    )
    on_reject: Target | None = Field(
        None, description="approval: where a rejection goes (before branches and next)"
    )

    @model_validator(mode="before")
    @classmethod
    def _agent_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind", "agent") == "agent" and data.get("timeout_s") is None:
            return {**data, "timeout_s": AGENT_TIMEOUT_S}
        return data

    @model_validator(mode="after")
    def _kind_fits(self) -> StepDef:
        given = {f for f in type(self).model_fields if getattr(self, f) not in (None, [])}
        if self.kind == "agent":
            if not self.agent:
                raise ValueError(f"step {self.name!r}: an agent step needs `agent`")
            extra = sorted(given & {"approvers", "signal", "on_timeout", "on_reject"})
        else:
            extra = sorted(given & {"agent", "model", "models", "compensate", "choose", "input"})
            if self.kind == "wait" and not self.signal:
                raise ValueError(f"step {self.name!r}: a wait step needs `signal` (the name it waits for)")
            extra += sorted(given & ({"approvers", "on_reject"} if self.kind == "wait" else {"signal"}))
        if self.kind != "agent" and self.pool != DEFAULT_POOL:
            extra.append("pool")  # an approval or a wait is decided, never executed
        if extra:
            raise ValueError(f"step {self.name!r}: kind {self.kind} takes no {', '.join(extra)}")
        return self

    @property
    def attempt_s(self) -> float:
        """agent: how long one attempt may take."""
        return self.timeout_s if self.timeout_s is not None else AGENT_TIMEOUT_S

    @property
    def wait_ms(self) -> int | None:
        """approval/wait: how long the step waits (None: until answered)."""
        return None if self.timeout_s is None else round(self.timeout_s * 1000)

    @property
    def ladder(self) -> list[str | None]:
        """The model aliases attempts escalate along (one entry, possibly None, when there is no ladder)."""
        return list(self.models) if self.models else [self.model]


class WorkflowDef(_Def):
    """A named, versioned workflow. Steps form a directed acyclic graph; each step runs once per run."""

    name: str = Field(pattern=NAME)
    version: str = "1"
    description: str = ""
    start: Target | None = None
    steps: list[StepDef] = Field(min_length=1)
    outcomes: list[str] = Field(default_factory=lambda: ["completed"])
    budget_usd: Decimal | None = Field(
        None, ge=0, description="default budget of each run (a request may set one)"
    )
    deadline_grace_s: float = Field(
        30.0, ge=0, description="a task's result may come this long after its timeout before a re-issue"
    )

    @field_validator("outcomes")
    @classmethod
    def _outcomes_named(cls, v: list[str]) -> list[str]:
        return v if "completed" in v else [*v, "completed"]

    @model_validator(mode="after")
    def _graph_is_valid(self) -> WorkflowDef:
        names = [s.name for s in self.steps]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"step names must be unique; repeated: {sorted(dupes)}")
        known = set(names)

        def check(where: str, target: Target | None) -> None:
            if not targets(target):
                raise ValueError(f"{where}: an empty list of steps goes nowhere")
            for t in targets(target):
                if t.startswith(END):
                    if t[len(END) :] not in self.outcomes:
                        raise ValueError(
                            f"{where}: outcome {t[len(END) :]!r} is not in outcomes {self.outcomes}"
                        )
                elif t not in known:
                    raise ValueError(f"{where}: unknown step {t!r}; steps are {names}")

        check("start", self.start or names[0])
        for s in self.steps:
            check(f"step {s.name!r} next", s.next)
            for i, b in enumerate(s.branches):
                check(f"step {s.name!r} branches[{i}].goto", b.goto)
            for extra in ("on_timeout", "on_reject"):
                if getattr(s, extra) is not None:
                    check(f"step {s.name!r} {extra}", getattr(s, extra))
            for n in s.needs:
                if n not in known:
                    raise ValueError(f"step {s.name!r} needs unknown step {n!r}")
            if s.choose is not None and len(s.models) < 2:
                raise ValueError(f"step {s.name!r}: choose picks a rung of `models`, which needs two or more")
            for arg, path in (s.input or {}).items():
                head, _, rest = path.partition(".")
                if head == "steps":
                    ref = rest.split(".")[0]
                    if ref not in known:
                        raise ValueError(f"step {s.name!r} input {arg!r}: unknown step {ref!r} in {path!r}")
                elif head not in ("input", "run"):
                    raise ValueError(f"step {s.name!r} input {arg!r}: path must start with input. or steps.")
        self._check_acyclic()
        return self

    def _check_acyclic(self) -> None:
        edges = {s.name: self.successors(s) for s in self.steps}
        for s in self.steps:  # a join depends on what it needs: that is an edge too
            for n in s.needs:
                edges[n].append(s.name)
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> None:
            if state.get(n) == 1:
                raise ValueError(
                    f"steps form a cycle: {' -> '.join([*path, n])}; each step runs once per run"
                )
            if state.get(n) == 2:
                return
            state[n] = 1
            for m in edges[n]:
                visit(m, [*path, n])
            state[n] = 2

        for n in edges:
            visit(n, [])

    @staticmethod
    def successors(step: StepDef) -> list[str]:
        out = [t for t in targets(step.next) if not t.startswith(END)]
        for b in step.branches:
            out += [t for t in targets(b.goto) if not t.startswith(END)]
        for extra in (step.on_timeout, step.on_reject):
            if extra is not None:
                out += [t for t in targets(extra) if not t.startswith(END)]
        return out

    def step(self, name: str) -> StepDef:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def first(self) -> Target:
        return self.start or self.steps[0].name

    @cached_property
    def digest(self) -> str:
        """The definition's content hash: sha256 of its validated model as canonical JSON, 12 hex digits.

        With the name and the version it is a definition's identity: a run is pinned to all three (see
        ``calmrun.workflow.registry``). Defaults are part of the model, so spelling one out changes nothing.
        """
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_workflow(path: Path) -> WorkflowDef:
    """Read and validate one YAML workflow definition.

    Raises:
        ConfigError: unreadable YAML or an invalid definition; names the file, step and field.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_workflow(data, source=str(path))


def parse_workflow(data: Any, *, source: str = "<workflow>") -> WorkflowDef:
    """Validate a workflow given as plain data; errors name ``source``, the step and the field."""
    try:
        return WorkflowDef.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid workflow: {describe_errors(exc, data)}") from exc


def describe_errors(exc: ValidationError, data: Any, root: str = "workflow") -> str:
    """Render validation errors as 'steps[1] (extract).retry.max_attempts: message' (``root``: no field)."""
    parts = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        for i, p in enumerate(loc):
            if isinstance(p, int):
                where += f"[{p}]"
                if i > 0 and loc[i - 1] == "steps" and isinstance(data, dict):
                    steps = data.get("steps") or []
                    if p < len(steps) and isinstance(steps[p], dict) and "name" in steps[p]:
                        where += f" ({steps[p]['name']})"
            else:
                where += ("." if where else "") + str(p)
        parts.append(f"{where or root}: {err['msg']}")
    return "; ".join(parts)

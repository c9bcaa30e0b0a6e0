"""Workflow definitions: steps, transitions, branches, fan-out/join, retries and outcomes.

Written as YAML files or built as Python objects; both are validated by the same pydantic models, and
errors name the file, the step and the field.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from calmrun.errors import ConfigError
from calmrun.workflow.kinds import AgentStep, Step, StepKind, WaitingStep
from calmrun.workflow.kinds.agent import AGENT_TIMEOUT_S, ESCALATIONS, CheapestMeeting, Choose, Escalation
from calmrun.workflow.steps import (
    DEFAULT_POOL,
    END,
    NAME,
    Branch,
    Condition,
    RetryPolicy,
    StepDef,
    Target,
    _Def,
    lookup,
    targets,
)

__all__ = [
    "AGENT_TIMEOUT_S",
    "DEFAULT_POOL",
    "END",
    "ESCALATIONS",
    "NAME",
    "WAITING_KINDS",
    "AgentStep",
    "Branch",
    "CheapestMeeting",
    "Choose",
    "Condition",
    "Escalation",
    "RetryPolicy",
    "Step",
    "StepDef",
    "StepKind",
    "Target",
    "WaitingStep",
    "WorkflowDef",
    "describe_errors",
    "load_workflow",
    "lookup",
    "parse_workflow",
    "targets",
]

WAITING_KINDS: frozenset[str] = frozenset({"approval", "wait"})

_LEGACY_STEP: dict[str, Any] = {
    "agent": None,
    "model": None,
    "input": None,
    "compensate": None,
    "models": [],
    "escalate_on": list(ESCALATIONS),
    "confidence_field": None,
    "min_confidence": None,
    "choose": None,
    "approvers": [],
    "signal": None,
    "on_timeout": None,
    "on_reject": None,
}
"""The fields every step had in the flat definition of 0.3, with their defaults: a step's digest form
holds them all, so the digest of a definition written then stays the same (runs stay pinned to it)."""


def _digest_form(step: StepDef) -> dict[str, Any]:
    dumped = step.model_dump(mode="json")
    base = set(StepDef.model_fields) | set(_LEGACY_STEP)
    for name, field in type(step).model_fields.items():  # fields of later kinds count only when set
        if name not in base and dumped.get(name) == field.get_default(call_default_factory=True):
            dumped.pop(name)
    return {**_LEGACY_STEP, **dumped}


class WorkflowDef(_Def):
    """A named, versioned workflow. Steps form a directed acyclic graph; each step runs once per run."""

    name: str = Field(pattern=NAME)
    version: str = "1"
    description: str = ""
    start: Target | None = None
    steps: list[Step] = Field(min_length=1)
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
            for field, target in s.exits():
                check(f"step {s.name!r} {field}", target)
            for n in s.needs:
                if n not in known:
                    raise ValueError(f"step {s.name!r} needs unknown step {n!r}")
            s.validate_in(known)
        self._check_acyclic()
        for s in self.steps:
            for back in s.back_edges():
                body = self.between(back, s.name)
                if not body:
                    raise ValueError(f"step {s.name!r} goto: {back!r} does not lead back to {s.name!r}")
                inner = [b for b in body if self.step(b).back_edges()]
                if inner:
                    raise ValueError(
                        f"step {s.name!r}: loops do not nest; its body holds the loop {inner[0]!r}"
                    )
        return self

    @cached_property
    def edges(self) -> dict[str, list[str]]:
        """Forward edges (a loop's way back excluded): where each step leads, a needed step to its join."""
        edges = {s.name: self.successors(s) for s in self.steps}
        for s in self.steps:  # a join depends on what it needs: that is an edge too
            for n in s.needs:
                edges[n].append(s.name)
        return edges

    def between(self, first: str, last: str) -> list[str]:
        """The steps on a forward path from ``first`` to ``last`` (``last`` excluded), in definition order."""
        edges = self.edges
        after = self._reach(first, edges)
        back: dict[str, list[str]] = {n: [] for n in edges}
        for n, outs in edges.items():
            for m in outs:
                back[m].append(n)
        before = self._reach(last, back)
        return [s.name for s in self.steps if s.name in after and s.name in before and s.name != last]

    @staticmethod
    def _reach(start: str, edges: dict[str, list[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for m in edges.get(todo.pop(), []):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    def _check_acyclic(self) -> None:
        edges = {n: list(outs) for n, outs in self.edges.items()}
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
    def successors(step: Step | StepDef) -> list[str]:
        out = [t for t in targets(step.next) if not t.startswith(END)]
        for b in step.branches:
            out += [t for t in targets(b.goto) if not t.startswith(END)]
        for _, extra in step.exits():
            out += [t for t in targets(extra) if not t.startswith(END)]
        return out

    @cached_property
    def steps_by_name(self) -> dict[str, Step]:
        return {s.name: s for s in self.steps}

    def step(self, name: str) -> Step:
        """The step called ``name``.

        Raises:
            KeyError: no such step.
        """
        return self.steps_by_name[name]

    @property
    def first(self) -> Target:
        return self.start or self.steps[0].name

    @cached_property
    def digest(self) -> str:
        """The definition's content hash: sha256 of its validated model as canonical JSON, 12 hex digits.

        With the name and the version it is a definition's identity: a run is pinned to all three (see
        ``calmrun.workflow.registry``). Defaults are part of the model, so spelling one out changes nothing.
        """
        form = {**self.model_dump(mode="json"), "steps": [_digest_form(s) for s in self.steps]}
        text = json.dumps(form, sort_keys=True, separators=(",", ":"))
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
        if len(loc) > 2 and loc[0] == "steps" and isinstance(loc[1], int) and loc[2] in StepDef.kinds():
            del loc[2]  # the union's tag: the kind is the step's, not a field of it
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

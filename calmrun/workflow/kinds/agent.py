"""``kind: agent`` (the default): an agent runs the step, as a task on the step's topic.

Start: resolve the step's input, check the run's budget, send attempt N as a ``StepTask`` with a deadline
(``timeout_s`` plus the workflow's grace). Answer: a ``StepResult`` for the attempt in flight; an output
routes the run on (or escalates to the next model when its confidence is low), an error is retried by the
retry policy with backoff, escalated along the model ladder, or quarantines the run. Due: a retry whose
backoff passed is issued; an attempt whose deadline passed with no result is issued again, same attempt
and same idempotency key (the task was lost, it did not fail). A succeeded step with ``compensate`` is
undone by that agent when the run is quarantined or cancelled. An attempt whose agent called a tool that
needs approval reports ``ToolApprovalPending`` with the calls: the step waits (``tool_approval`` in its
state, no deadline); an answer (``answer_tool``, from ``tool_approvers``) re-issues the same attempt with
the answers on its task.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from calmrun.errors import ErrorKind, InputMappingError
from calmrun.workflow.events import Answer, StepResult, StepTask
from calmrun.workflow.state import RunState
from calmrun.workflow.steps import DEFAULT_POOL, StepDef, Target, _Def, lookup

if TYPE_CHECKING:
    from calmrun.workflow.definition import WorkflowDef
    from calmrun.workflow.transitions import Transitions

AGENT_TIMEOUT_S = 30.0
Escalation = Literal["invalid_output", "low_confidence", "exhausted"]
ESCALATIONS: tuple[Escalation, ...] = ("invalid_output", "low_confidence", "exhausted")
TaskKind = Literal["run", "compensate"]


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


class Route(_Def):
    """The agent chooses where the run goes: its output's ``field`` names one of ``allowed``."""

    field: str = Field(description="dotted path in the output that names the next step (or end:<outcome>)")
    allowed: list[str] = Field(min_length=1, description="the steps and end:<outcome>s it may name")


class AgentStep(StepDef):
    """A step an agent runs: which agent, on which input, with which models, undone by which agent."""

    KIND = "agent"
    kind: Literal["agent"] = "agent"
    agent: str | None = Field(None, description="registered agent name or 'module:attr'")
    model: str | None = Field(None, description="model alias from configuration")
    input: dict[str, str] | None = Field(
        None,
        description="argument -> path: 'input.x' (run input), 'steps.<step>.x' (earlier output); "
        "a path ending in '?' gives null while it is absent",
    )
    compensate: str | None = Field(
        None, description="agent that undoes this step when the run is quarantined"
    )
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
    choose: Choose | None = Field(
        None, description="pick the starting rung of `models` from observed success rates (the planner)"
    )
    route: Route | None = Field(
        None, description="the output names the next step, from an allowed set (instead of next/branches)"
    )
    tool_approvers: list[str] = Field(
        default_factory=list,
        description="who may answer a tool call of the agent that needs approval (empty: anyone)",
    )

    @model_validator(mode="before")
    @classmethod
    def _agent_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("timeout_s") is None:
            return {**data, "timeout_s": AGENT_TIMEOUT_S}
        return data

    @model_validator(mode="after")
    def _has_agent(self) -> AgentStep:
        if not self.agent:
            raise ValueError(f"step {self.name!r}: an agent step needs `agent`")
        return self

    def validate_in(self, steps: set[str]) -> None:
        if self.route is not None and (self.next is not None or self.branches):
            raise ValueError(
                f"step {self.name!r} route: the output chooses; a step with route takes no next or branches"
            )
        if self.choose is not None and len(self.models) < 2:
            raise ValueError(f"step {self.name!r}: choose picks a rung of `models`, which needs two or more")
        for arg, path in (self.input or {}).items():
            head, _, rest = path.removesuffix("?").partition(".")
            if head == "steps":
                ref = rest.split(".")[0]
                if ref not in steps:
                    raise ValueError(f"step {self.name!r} input {arg!r}: unknown step {ref!r} in {path!r}")
            elif head not in ("input", "run"):
                raise ValueError(f"step {self.name!r} input {arg!r}: path must start with input. or steps.")

    @classmethod
    def executed(cls) -> bool:
        return True

    @property
    def attempt_s(self) -> float:
        """How long one attempt may take."""
        return self.timeout_s if self.timeout_s is not None else AGENT_TIMEOUT_S

    @property
    def ladder(self) -> list[str | None]:
        return list(self.models) if self.models else [self.model]

    def compensation(self) -> str | None:
        return self.compensate

    def runs_agent(self) -> str | None:
        return self.agent

    def exits(self) -> list[tuple[str, Target]]:
        allowed = self.route.allowed if self.route is not None else []
        return [(f"route.allowed[{i}]", t) for i, t in enumerate(allowed)]

    # -- transitions --------------------------------------------------------------------------------

    def issue(self, t: Transitions, name: str) -> None:
        _issue(t, name, "run")

    def undo(self, t: Transitions, name: str) -> None:
        _issue(t, name, "compensate")

    def due(self, t: Transitions, name: str) -> None:
        st = t.mut(name)  # an earlier due step may have changed it (a quarantine cancels)
        kind: TaskKind = "compensate" if st.status == "compensating" else "run"
        if st.due_ms is not None:
            if kind == "compensate" or st.status == "retry_wait":
                _issue(t, name, kind)
        elif st.deadline_ms is not None:
            # no result by the deadline: the task was lost (or waits behind a backlog), it did not fail.
            # Issue the same attempt again under the same idempotency key; a new attempt is only ever
            # made for a failure or timeout that the attempt itself reported.
            _reissue(t, name, kind)


def result(t: Transitions, r: StepResult) -> None:
    """The answer of the attempt in flight (the caller checked ``awaits``): route, retry or escalate."""
    st = t.mut(r.step)
    if r.ok:
        t.emit("step.succeeded", r.step, r.attempt, {"kind": r.kind, "output": r.output}, r.cost)
    else:
        data: dict[str, Any] = {
            "kind": r.kind,
            "error_type": r.error_type,
            "error": r.error,
            "retriable": r.retriable,
        }
        if r.retry_after_ms is not None:
            data["retry_after_ms"] = r.retry_after_ms
        if r.output is not None:  # a paused attempt: the tool calls it waits on
            data["output"] = r.output
        t.emit("step.failed", r.step, r.attempt, data, r.cost)
    t.s.spent_usd += r.cost.cost_usd
    st.deadline_ms = None
    st.finished_ms = t.s.clock_ms
    if r.kind == "compensate":
        if r.ok:
            st.status = "compensated"
            t.emit("step.compensated", r.step, r.attempt)
            t.next_compensation(done=r.step)
        else:
            fail_attempt(t, r.step, r.error_type or "Error", r.error or "", r.retriable, r.retry_after_ms)
    elif r.ok:
        low = _low_confidence(t, r.step, r.output or {})
        refused = _route_refused(t, r.step, r.output or {})
        if low is not None and _can_escalate(t, r.step, "low_confidence"):
            _escalate(t, r.step, "low_confidence", {"confidence": low})
        elif refused is not None:
            t.emit("step.route_refused", r.step, r.attempt, refused)
            if _can_escalate(t, r.step, "invalid_output"):
                _escalate(t, r.step, "invalid_output", {"error": refused["error"]})
            else:
                fail_attempt(t, r.step, ErrorKind.INVALID_ROUTE, refused["error"], retriable=True)
        else:
            done = t.succeed(r.step, dict(r.output or {}))
            done.error_type = done.error = None
            sd = step_of(t.wf, r.step)
            if sd.route is None:
                t.route(r.step)
            else:
                chosen = str(lookup(r.output or {}, sd.route.field)[1])
                t.emit("run.routed", r.step, data={"to": [chosen], "by": "route", **t.iteration_of(r.step)})
                t.goto([chosen])
    elif r.error_type == ErrorKind.TOOL_APPROVAL_PENDING and _pending_calls(r):
        _pause(t, r)
    elif r.error_type == ErrorKind.INVALID_OUTPUT and _can_escalate(t, r.step, "invalid_output"):
        st.error_type, st.error = r.error_type, r.error
        _escalate(t, r.step, "invalid_output", {"error": (r.error or "")[:500]})
    else:
        fail_attempt(t, r.step, r.error_type or "Error", r.error or "", r.retriable, r.retry_after_ms)


def _pending_calls(r: StepResult) -> list[dict[str, Any]]:
    """The tool calls a paused run attempt waits on (none: not a pause, the result is a failure)."""
    calls = (r.output or {}).get("tool_approval") if r.kind == "run" else None
    ok = isinstance(calls, list) and calls and all(isinstance(c, dict) and "tool_call_id" in c for c in calls)
    return list(calls) if ok else []  # type: ignore[arg-type]


def _pause(t: Transitions, r: StepResult) -> None:
    """The attempt's agent called tools that need a person: the step waits, the attempt stays the same."""
    st, sd = t.mut(r.step), step_of(t.wf, r.step)
    pending = _pending_calls(r)
    held = dict(st.tool_approval or {})
    held["pending"] = pending
    held.setdefault("answers", {})
    st.tool_approval = held
    st.status, st.deadline_ms, st.due_ms, st.finished_ms = "waiting", None, None, None
    t.emit(
        "step.waiting",
        r.step,
        r.attempt,
        {
            "kind": "tool_approval",
            "due_ms": None,
            "approvers": list(sd.tool_approvers),
            "tool_calls": pending,
            **t.iteration_of(r.step),
        },
    )


def answer_tool(t: Transitions, a: Answer) -> bool:
    """A person's answer to the tool calls an agent step waits on: the same attempt runs again with it.

    False (with ``t.why``) when the step does not wait for one, or the person may not answer it.
    """
    sd, st = step_of(t.wf, a.step), t.s.steps.get(a.step)
    held = st.tool_approval if st is not None else None
    pending = (held or {}).get("pending") or []
    if st is None or st.status != "waiting" or not pending:
        answered = (held or {}).get("answers") or {}
        if st is not None and answered and st.status != "waiting":
            t.why = f"a second answer: the tool calls of {a.step!r} were answered (it is {st.status})"
        else:
            where = st.status if st is not None else "not started"
            t.why = f"step {a.step!r} is not waiting for a tool call's approval (it is {where})"
        return False
    if a.tool_call_id is not None and all(c["tool_call_id"] != a.tool_call_id for c in pending):
        t.why = f"{a.step!r} does not wait on tool call {a.tool_call_id!r} (an answer to an earlier one?)"
        return False
    if sd.tool_approvers and a.by not in sd.tool_approvers:
        t.why = f"{a.by!r} may not answer {a.step!r}: its tool_approvers are {sd.tool_approvers}"
        return False
    st = t.mut(a.step)
    verb: Literal["step.approved", "step.rejected"] = "step.approved" if a.approved else "step.rejected"
    ids = [str(c["tool_call_id"]) for c in pending if a.tool_call_id in (None, c["tool_call_id"])]
    named = {} if a.tool_call_id is None else {"tool_call_id": a.tool_call_id}
    t.emit(verb, a.step, st.attempt, {"by": a.by, "comment": a.comment, **named, "tool_call_ids": ids})
    answers = dict((held or {}).get("answers") or {})
    for c in pending:
        i = str(c["tool_call_id"])
        if i in ids:  # billed: how many journal entries the pause's result reported (not counted again)
            billed = {} if c.get("position") is None else {"billed": c["position"]}
            answers[i] = {"approved": a.approved, "by": a.by, "comment": a.comment, **billed}
    left = [c for c in pending if str(c["tool_call_id"]) not in answers]
    st.tool_approval = {"pending": left, "answers": answers}
    if not left:  # every call the attempt waits on is answered: it runs again, the same attempt
        st.status = "scheduled"
        _reissue(t, a.step, "run")
    return True


def step_of(wf: WorkflowDef, name: str) -> AgentStep:
    sd = wf.step(name)
    assert isinstance(sd, AgentStep), f"step {name!r} is a {sd.kind} step, not an agent step"
    return sd


def backoff_ms(wf: WorkflowDef, run_id: str, step: str, attempt: int, retry_base: int) -> int:
    """Delay before the attempt after ``attempt``: exponential, capped, jitter hashed from its identity."""
    policy = wf.step(step).retry
    base = policy.initial_backoff_s * policy.multiplier ** max(0, attempt - retry_base - 1)
    base = min(base, policy.max_backoff_s)
    u = zlib.crc32(f"{run_id}/{step}/{attempt}".encode()) / 0xFFFFFFFF
    return max(0, round(base * (1 + policy.jitter * (2 * u - 1)) * 1000))


def resolve_input(wf: WorkflowDef, s: RunState, step: str) -> dict[str, Any]:
    """The agent's input for ``step``: the run input, or the step's mapping over input and outputs."""
    mapping: dict[str, str] | None = getattr(wf.step(step), "input", None)  # the kinds that run agents
    if mapping is None:
        return dict(s.input)
    scope = {
        "input": s.input,
        "run": {"run_id": s.run_id, "tenant": s.tenant, "workflow": s.workflow},
        "steps": s.outputs(),
    }
    out: dict[str, Any] = {}
    for arg, path in mapping.items():
        optional = path.endswith("?")  # 'steps.review?': null while absent (a loop's first iteration)
        found, value = lookup(scope, path.removesuffix("?"))
        if not found and not optional:
            raise InputMappingError(f"step {step!r} input {arg!r}: {path!r} is not in the run")
        out[arg] = value
    return out


def choose_rung(sd: AgentStep, figures: dict[str, dict[str, Any]]) -> tuple[int, str]:
    """The starting rung of a step with ``choose`` from the figures stamped on the request, and why."""
    assert sd.choose is not None
    rule = sd.choose.cheapest_meeting
    for i, alias in enumerate(sd.models):
        f = figures.get(alias) or {}
        attempts, accepted = int(f.get("attempts", 0)), int(f.get("accepted", 0))
        if attempts < rule.min_attempts:
            return i, f"{alias}: {attempts} attempts in the window, fewer than {rule.min_attempts}"
        rate = accepted / attempts
        if rate >= rule.success_rate:
            return i, f"{alias}: success rate {rate:.3f} over {attempts} attempts meets {rule.success_rate}"
    return 0, f"no alias meets success rate {rule.success_rate}: the ladder from its first rung"


def _pool(pool: str) -> dict[str, str]:
    """A scheduled task's pool, on its event only when it is not the default (who runs it, for people)."""
    return {} if pool == DEFAULT_POOL else {"pool": pool}


def _issue(t: Transitions, name: str, kind: TaskKind) -> None:
    s, sd = t.s, step_of(t.wf, name)
    st = t.mut(name)
    try:
        task_input = resolve_input(t.wf, s, name)
    except InputMappingError as exc:
        st.status = "failed"
        t.quarantine_run(name, st.attempt, ErrorKind.INPUT_MAPPING, str(exc))
        return
    if kind == "run" and _over_budget(t, name):
        return
    st.attempt += 1
    st.status = "scheduled" if kind == "run" else "compensating"
    st.scheduled_ms = s.clock_ms
    st.deadline_ms = s.clock_ms + round((sd.attempt_s + t.wf.deadline_grace_s) * 1000)
    st.due_ms = None
    agent = (sd.agent if kind == "run" else sd.compensate) or ""
    t.tasks.append(_task(t, name, kind, agent, task_input))
    t.emit(
        "step.scheduled" if kind == "run" else "step.compensation_scheduled",
        name,
        st.attempt,
        {
            "agent": agent,
            "model": st.model,
            "deadline_ms": st.deadline_ms,
            **_pool(sd.pool),
            **t.iteration_of(name),
        },
    )


def _reissue(t: Transitions, name: str, kind: TaskKind) -> None:
    """Send the current attempt of ``name`` again (same attempt, same key) with a fresh deadline."""
    s, sd = t.s, step_of(t.wf, name)
    st = t.mut(name)
    previous = st.deadline_ms
    st.deadline_ms = s.clock_ms + round((sd.attempt_s + t.wf.deadline_grace_s) * 1000)
    agent = (sd.agent if kind == "run" else sd.compensate) or ""
    t.tasks.append(_task(t, name, kind, agent, resolve_input(t.wf, s, name)))
    t.emit(
        "step.reissued",
        name,
        st.attempt,
        {
            "kind": kind,
            "agent": agent,
            "model": st.model,
            "expired_ms": previous,
            "deadline_ms": st.deadline_ms,
            **_pool(sd.pool),
        },
    )


def _task(t: Transitions, name: str, kind: TaskKind, agent: str, task_input: dict[str, Any]) -> StepTask:
    return _attempt_task(t.wf, t.s, name, kind, agent, task_input, t.s.clock_ms)


def awaited_task(wf: WorkflowDef, s: RunState, name: str) -> StepTask | None:
    """The task of the attempt of ``name`` that ``s`` awaits, as the decision that last issued it made it
    (same attempt, key, input and issue time), or None when it awaits none or its input no longer maps."""
    st, sd = s.steps.get(name), step_of(wf, name)
    if st is None or st.deadline_ms is None or st.status not in ("scheduled", "compensating"):
        return None
    kind: TaskKind = "run" if st.status == "scheduled" else "compensate"
    try:
        task_input = resolve_input(wf, s, name)
    except InputMappingError:
        return None
    issued = st.deadline_ms - round((sd.attempt_s + wf.deadline_grace_s) * 1000)  # as _issue, _reissue
    agent = (sd.agent if kind == "run" else sd.compensate) or ""
    return _attempt_task(wf, s, name, kind, agent, task_input, issued)


def _attempt_task(
    wf: WorkflowDef,
    s: RunState,
    name: str,
    kind: TaskKind,
    agent: str,
    task_input: dict[str, Any],
    issued_ms: int,
) -> StepTask:
    st = s.steps[name]
    answers = (st.tool_approval or {}).get("answers") if kind == "run" else None
    return StepTask(
        run_id=s.run_id,
        workflow=s.workflow,
        version=s.version,
        step=name,
        attempt=st.attempt,
        kind=kind,
        agent=agent,
        model=st.model,
        input=task_input,
        tenant=s.tenant,
        issued_ms=issued_ms,
        timeout_s=step_of(wf, name).attempt_s,
        iteration=st.iteration,
        approvals=dict(answers) if answers else None,
        first_issued_ms=st.scheduled_ms if answers else None,
    )


def _over_budget(t: Transitions, name: str) -> bool:
    """Stop the run before an attempt that would take it past its budget."""
    s, sd = t.s, t.wf.step(name)
    if s.budget_usd is None or s.spent_usd + sd.estimated_cost_usd <= s.budget_usd:
        return False
    st = t.mut(name)
    st.status = "cancelled"
    error = (
        f"spent ${s.spent_usd} of a ${s.budget_usd} budget; step {name!r} "
        f"(estimated ${sd.estimated_cost_usd}) would exceed it"
    )
    t.emit(
        "run.over_budget",
        name,
        st.attempt + 1,
        {
            "spent_usd": str(s.spent_usd),
            "budget_usd": str(s.budget_usd),
            "estimated_usd": str(sd.estimated_cost_usd),
        },
    )
    t.quarantine_run(name, st.attempt, ErrorKind.OVER_BUDGET, error, status="over_budget")
    return True


def fail_attempt(
    t: Transitions, name: str, error_type: str, error: str, retriable: bool, retry_after_ms: int | None = None
) -> None:
    """An attempt failed: retry it after a backoff, escalate to the next model, or quarantine the run."""
    s, st = t.s, t.mut(name)
    policy = t.wf.step(name).retry
    compensating = st.status == "compensating"
    st.error_type, st.error = error_type, error
    if retriable and st.attempt - st.retry_base < policy.max_attempts:
        delay = max(backoff_ms(t.wf, s.run_id, name, st.attempt, st.retry_base), retry_after_ms or 0)
        st.due_ms = s.clock_ms + delay
        if not compensating:
            st.status = "retry_wait"
        t.emit(
            "step.retry_scheduled",
            name,
            st.attempt,
            {"due_ms": st.due_ms, "delay_ms": delay, "error_type": error_type},
        )
    elif compensating:
        st.status = "compensation_failed"
        t.emit("step.compensation_failed", name, st.attempt, {"error_type": error_type, "error": error})
        t.next_compensation(done=name)
    elif _can_escalate(t, name, "exhausted"):
        _escalate(t, name, "exhausted", {"error_type": error_type})
    else:
        st.status = "failed"
        t.quarantine_run(name, st.attempt, error_type, error)


def _low_confidence(t: Transitions, name: str, output: dict[str, Any]) -> float | None:
    sd = step_of(t.wf, name)
    if sd.confidence_field is None or sd.min_confidence is None:
        return None
    found, value = lookup(output, sd.confidence_field)
    if not found or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return float(value) if value < sd.min_confidence else None


def _route_refused(t: Transitions, name: str, output: dict[str, Any]) -> dict[str, Any] | None:
    """Why the output's chosen route is refused (not found, not a name, not allowed); None when it fits."""
    route = step_of(t.wf, name).route
    if route is None:
        return None
    found, value = lookup(output, route.field)
    if found and isinstance(value, str) and value in route.allowed:
        return None
    shown = repr(value)[:100] if found else "nothing"
    error = f"step {name!r} chose {shown} in {route.field!r}; allowed: {route.allowed}"
    return {
        "field": route.field,
        "value": value if found else None,
        "allowed": list(route.allowed),
        "error": error,
    }


def _can_escalate(t: Transitions, name: str, reason: Escalation) -> bool:
    sd, st = step_of(t.wf, name), t.s.steps[name]
    return reason in sd.escalate_on and st.model_index + 1 < len(sd.ladder)


def _escalate(t: Transitions, name: str, reason: str, detail: dict[str, Any]) -> None:
    """Move the step to the next model alias on its ladder, with a fresh retry budget."""
    sd, st = step_of(t.wf, name), t.mut(name)
    before = st.model
    st.model_index += 1
    st.model = sd.ladder[st.model_index]
    st.retry_base = st.attempt
    st.status = "scheduled"
    t.emit("step.escalated", name, st.attempt, {"from": before, "to": st.model, "reason": reason, **detail})
    _issue(t, name, "run")

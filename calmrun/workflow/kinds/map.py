"""``kind: map``: an agent runs once per element of a list, at most ``max_concurrency`` at a time, and
the outputs are gathered in element order into the step's one output.

```yaml
- name: match
  kind: map
  for_each: steps.extract.lines     # a list in the run input (input.x) or an earlier output (steps.s.x)
  agent: matcher                    # called with {"item": <element>, "index": i, ...input}
  max_concurrency: 8
  max_elements: 500                 # wider lists fail the step (the limits count this width)
  on_element_failure: collect       # or fail (the default): the step fails with the first failed element
  next: reconcile
```

Each element is its own task (``element`` on the task, the key ``run/step[i]/run/attempt``) with its own
attempts under the step's retry policy and timeout; a lost task is re-issued by its deadline under the
same key, as any step's. The step's output is ``{"items": [...]}`` in element order, with ``"errors":
[{"index", "error_type", "error"}]`` when failures are collected (their items are null).

The state stays compact however wide the list: elements are issued in index order, so one counter says
which were; only the elements in flight or waiting for a retry (at most ``max_concurrency``) have an entry;
the outputs are one JSON list. Each element output is held to ``max_element_bytes`` (as JSON) so that the
widest map's state is bounded before the run starts (``calmrun.limits``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from calmrun.errors import ErrorKind, InputMappingError
from calmrun.workflow.events import StepResult, StepTask
from calmrun.workflow.kinds.agent import AGENT_TIMEOUT_S, backoff_ms
from calmrun.workflow.state import ElementState, MapState, RunState
from calmrun.workflow.steps import StepDef, lookup

if TYPE_CHECKING:
    from calmrun.workflow.definition import WorkflowDef
    from calmrun.workflow.transitions import Transitions

MAX_ELEMENTS = 100_000


class MapStep(StepDef):
    """Run ``agent`` once per element of the list at ``for_each``; gather the outputs in order."""

    KIND = "map"
    kind: Literal["map"] = "map"
    for_each: str = Field(description="path of the list: 'input.<field>' or 'steps.<step>.<field>'")
    agent: str = Field(description="registered agent name or 'module:attr', called once per element")
    model: str | None = Field(None, description="model alias from configuration")
    input: dict[str, str] | None = Field(None, description="more arguments, as an agent step's input")
    max_concurrency: int = Field(4, ge=1, le=1000, description="elements in flight at once")
    max_elements: int = Field(1000, ge=1, le=MAX_ELEMENTS, description="the widest list the step takes")
    max_element_bytes: int = Field(1024, ge=16, description="one element's output, as JSON")
    on_element_failure: Literal["fail", "collect"] = Field(
        "fail", description="fail: the step fails with the element; collect: keep the error, go on"
    )

    def runs_agent(self) -> str | None:
        return self.agent

    @model_validator(mode="before")
    @classmethod
    def _agent_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("timeout_s") is None:
            return {**data, "timeout_s": AGENT_TIMEOUT_S}
        return data

    def validate_in(self, steps: set[str]) -> None:
        head, _, rest = self.for_each.partition(".")
        if head == "steps":
            if rest.split(".")[0] not in steps:
                raise ValueError(f"step {self.name!r} for_each: unknown step in {self.for_each!r}")
        elif head != "input" or not rest:
            raise ValueError(f"step {self.name!r} for_each: a list in input.<field> or steps.<step>.<field>")
        for arg, path in (self.input or {}).items():
            if arg in ("item", "index"):
                raise ValueError(f"step {self.name!r} input {arg!r}: the element's own argument")
            if path.partition(".")[0] not in ("input", "steps", "run"):
                raise ValueError(f"step {self.name!r} input {arg!r}: path must start with input. or steps.")

    @classmethod
    def executed(cls) -> bool:
        return True

    @property
    def attempt_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else AGENT_TIMEOUT_S

    # -- transitions --------------------------------------------------------------------------------

    def issue(self, t: Transitions, name: str) -> None:
        """Start the map (the list is read now), or, on a redrive, issue its failed elements again."""
        st = t.mut(name)
        st.status, st.attempt = "scheduled", st.attempt + 1
        if st.map is None:
            items = _items(t, self, name)
            if items is None:
                return
            st.map = MapState(size=len(items), outputs=[None] * len(items), errors=[])
            t.emit(
                "step.mapped", name, st.attempt, {"size": len(items), "max_concurrency": self.max_concurrency}
            )
        else:
            m = st.map.model_copy()
            failed = {str(e["index"]): int(e["attempt"]) for e in m.errors or []}
            m.again = {**m.again, **failed}
            m.errors, m.done = [], m.done - len(failed)
            st.map = m
        _fill(t, self, name)

    def due(self, t: Transitions, name: str) -> None:
        st = t.mut(name)
        if st.map is None or st.status != "scheduled":
            return
        m, now = st.map.model_copy(), t.s.clock_ms
        m.running = dict(m.running)
        st.map = m
        for key in sorted(m.running, key=int):
            el = m.running[key]
            if el.due_ms is not None and el.due_ms <= now:  # a retry whose backoff passed
                m.running[key] = ElementState(attempt=el.attempt, retry_base=el.retry_base)
                _issue(t, self, name, int(key))
            elif el.deadline_ms is not None and el.deadline_ms <= now:  # lost: the same attempt again
                _issue(t, self, name, int(key), again=True)
        _timers(st)


def result(t: Transitions, r: StepResult) -> None:
    """The answer of an element's attempt in flight (the caller checked ``awaits``)."""
    assert r.element is not None
    sd = t.wf.step(r.step)
    assert isinstance(sd, MapStep)
    st = t.mut(r.step)
    assert st.map is not None
    m = st.map.model_copy()
    m.running = dict(m.running)
    st.map = m
    key = str(r.element)
    data: dict[str, Any] = {"kind": r.kind, "element": r.element}
    error_type, error = r.error_type, r.error
    if r.ok:
        size = len(json.dumps(r.output, separators=(",", ":"), ensure_ascii=False).encode())
        if size > sd.max_element_bytes:
            error_type = ErrorKind.INVALID_OUTPUT
            error = (
                f"element {r.element}: {size} bytes of JSON, over max_element_bytes {sd.max_element_bytes}"
            )
    if r.ok:
        t.emit("step.succeeded", r.step, r.attempt, {**data, "output": r.output}, r.cost)
    else:
        failed = {**data, "error_type": r.error_type, "error": r.error, "retriable": r.retriable}
        if r.retry_after_ms is not None:
            failed["retry_after_ms"] = r.retry_after_ms
        t.emit("step.failed", r.step, r.attempt, failed, r.cost)
    t.s.spent_usd += r.cost.cost_usd
    el = m.running[key]
    if error_type is None:
        m.outputs = [*m.outputs[: r.element], r.output, *m.outputs[r.element + 1 :]]
        del m.running[key]
        m.done += 1
    elif (r.retriable or r.ok) and el.attempt - el.retry_base < sd.retry.max_attempts:
        delay = max(backoff_ms(t.wf, t.s.run_id, r.step, el.attempt, el.retry_base), r.retry_after_ms or 0)
        m.running[key] = ElementState(
            attempt=el.attempt, retry_base=el.retry_base, due_ms=t.s.clock_ms + delay
        )
        data = {  # the step's retry, of one element
            "due_ms": t.s.clock_ms + delay,
            "delay_ms": delay,
            "error_type": error_type,
            "element": r.element,
        }
        t.emit("step.retry_scheduled", r.step, r.attempt, data)
    else:
        del m.running[key]
        m.done += 1
        failure = {
            "index": r.element,
            "attempt": el.attempt,
            "error_type": error_type,
            "error": (error or "")[:500],
        }
        m.errors = [*m.errors, failure]
        if sd.on_element_failure == "fail":
            st.status, st.deadline_ms, st.due_ms = "failed", None, None
            st.error_type = error_type or "Error"
            st.error = f"element {r.element}: {error or error_type}"
            m.running = {}
            t.quarantine_run(r.step, st.attempt, st.error_type, st.error)
            return
    _fill(t, sd, r.step)


def _items(t: Transitions, sd: MapStep, name: str) -> list[Any] | None:
    s = t.s
    scope = {"input": s.input, "steps": s.outputs(), "run": {"run_id": s.run_id, "tenant": s.tenant}}
    found, items = lookup(scope, sd.for_each)
    why = None
    if not found:
        why = f"step {name!r} for_each: {sd.for_each!r} is not in the run"
    elif not isinstance(items, list):
        why = f"step {name!r} for_each: {sd.for_each!r} is a {type(items).__name__}, not a list"
    elif len(items) > sd.max_elements:
        why = f"step {name!r} for_each: {len(items)} elements, over max_elements {sd.max_elements}"
    if why is not None:
        st = t.mut(name)
        st.status, st.error_type, st.error = "failed", ErrorKind.INPUT_MAPPING, why
        t.quarantine_run(name, st.attempt, ErrorKind.INPUT_MAPPING, why)
        return None
    return list(items)


def _fill(t: Transitions, sd: MapStep, name: str) -> None:
    """Issue elements until ``max_concurrency`` are in flight; succeed the step when all are done."""
    st = t.mut(name)
    assert st.map is not None
    m = st.map.model_copy()
    m.running, m.again = dict(m.running), dict(m.again)
    st.map = m
    while len(m.running) < sd.max_concurrency and (m.again or m.issued < m.size):
        if t.s.status != "running":
            return
        if m.again:  # a redrive: the failed elements first, their attempts going on
            key = min(m.again, key=int)
            made = m.again.pop(key)
            i, m.running[key] = int(key), ElementState(attempt=made, retry_base=made)
        else:
            i, m.issued = m.issued, m.issued + 1
            m.running[str(i)] = ElementState()
        _issue(t, sd, name, i)
        if st.status != "scheduled":  # over budget: the run stopped
            return
    _timers(st)
    if m.done == m.size and not m.running:
        output: dict[str, Any] = {"items": list(m.outputs)}
        if m.errors:
            output["errors"] = list(m.errors)
        t.succeed(name, output)
        t.route(name)


def _issue(t: Transitions, sd: MapStep, name: str, i: int, *, again: bool = False) -> None:
    from calmrun.workflow.kinds.agent import _over_budget  # the agent kind's own rules

    s, st = t.s, t.mut(name)
    assert st.map is not None
    el = st.map.running[str(i)]
    if not again and _over_budget(t, name):
        return
    previous = el.deadline_ms
    attempt = el.attempt if again else el.attempt + 1
    deadline = s.clock_ms + round((sd.attempt_s + t.wf.deadline_grace_s) * 1000)
    st.map.running[str(i)] = ElementState(attempt=attempt, retry_base=el.retry_base, deadline_ms=deadline)
    t.tasks.append(_element_task(t.wf, s, sd, name, i, attempt, s.clock_ms))
    data: dict[str, Any] = {"agent": sd.agent, "model": sd.model, "deadline_ms": deadline, "element": i}
    if again:
        t.emit("step.reissued", name, attempt, {**data, "kind": "run", "expired_ms": previous})
    else:
        t.emit("step.scheduled", name, attempt, {**data, **t.iteration_of(name)})


def awaited_tasks(wf: WorkflowDef, s: RunState, name: str) -> list[StepTask]:
    """The tasks of the element attempts of map step ``name`` that ``s`` awaits, as the decisions that last
    issued them made them (same attempt, key, input and issue time); none whose input no longer maps."""

    st, sd = s.steps.get(name), wf.step(name)
    if st is None or st.map is None or st.status != "scheduled" or not isinstance(sd, MapStep):
        return []
    out = []
    for key, el in sorted(st.map.running.items(), key=lambda kv: int(kv[0])):
        if el.deadline_ms is None:  # waiting for its retry: its timer issues it
            continue
        issued = el.deadline_ms - round((sd.attempt_s + wf.deadline_grace_s) * 1000)  # as _issue
        try:
            out.append(_element_task(wf, s, sd, name, int(key), el.attempt, issued))
        except InputMappingError:
            continue
    return out


def _element_task(
    wf: WorkflowDef, s: RunState, sd: MapStep, name: str, i: int, attempt: int, issued_ms: int
) -> StepTask:
    from calmrun.workflow.kinds.agent import resolve_input  # the agent kind's own rules

    scope_input = resolve_input(wf, s, name) if sd.input else {}
    items = _items_of(s, sd)
    return StepTask(
        run_id=s.run_id,
        workflow=s.workflow,
        version=s.version,
        step=name,
        attempt=attempt,
        agent=sd.agent,
        model=sd.model,
        input={**scope_input, "item": items[i] if i < len(items) else None, "index": i},
        tenant=s.tenant,
        issued_ms=issued_ms,
        timeout_s=sd.attempt_s,
        iteration=s.steps[name].iteration,
        element=i,
    )


def _items_of(s: RunState, sd: MapStep) -> list[Any]:
    found, items = lookup({"input": s.input, "steps": s.outputs()}, sd.for_each)
    return items if found and isinstance(items, list) else []


def _timers(st: Any) -> None:
    """The step's deadline and due time: the earliest of its elements' (what wakes the run's timer)."""
    m: MapState = st.map
    deadlines = [e.deadline_ms for e in m.running.values() if e.deadline_ms is not None]
    dues = [e.due_ms for e in m.running.values() if e.due_ms is not None]
    st.deadline_ms = min(deadlines) if deadlines else None
    st.due_ms = min(dues) if dues else None

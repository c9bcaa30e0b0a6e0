"""``awaited_tasks``: what a new owner starts from a restored state equals what the decisions issued.

For steps whose tasks are not written to a step topic, a worker that restores a run re-issues the attempts
its state awaits from the state alone (``streams.worker``). Each must be the task the decision that last
issued that attempt made: same attempt, idempotency key, input and issue time, approvals included.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given

from calmrun.workflow.decider import Decision, awaited_tasks, awaits, decide
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import Answer, DeciderInput, StepResult, StepTask, TimerFired
from calmrun.workflow.state import RunState
from tests.workflow import test_decider_tool_approval as tools
from tests.workflow.test_decider_loops import RUN, Run, critique
from tests.workflow.test_decider_map import element_tasks, invoices
from tests.workflow.test_decider_properties import SETTINGS, histories


class Issued:
    """The newest task issued for each attempt, checked against ``awaited_tasks`` after each decision."""

    def __init__(self, wf: WorkflowDef) -> None:
        self.wf = wf
        self.newest: dict[str, StepTask] = {}

    def after(self, d: Decision) -> None:
        for t in d.tasks:
            self.newest[t.idempotency_key] = t
        if d.state is None:
            return
        rebuilt = {t.idempotency_key: t for t in awaited_tasks(self.wf, d.state)}
        awaited = {k for k, t in self.newest.items() if awaits(d.state, t.step, t.attempt, t.kind, t.element)}
        assert set(rebuilt) == awaited
        for key, task in rebuilt.items():
            assert task == self.newest[key], key


def fold_checked(wf: WorkflowDef, inputs: list[DeciderInput]) -> RunState | None:
    issued, state = Issued(wf), None
    for inp in inputs:
        d = decide(wf, state, inp)
        issued.after(d)
        state = d.state if d.ignored is None else state
    return state


@SETTINGS
@given(histories())
def test_the_rebuilt_tasks_are_the_issued_ones_on_every_state(
    history: tuple[WorkflowDef, list[DeciderInput]],
) -> None:
    wf, inputs = history  # retries, deadline re-issues, fan-out, compensation, redrives
    fold_checked(wf, inputs)


class CheckedRun(Run):
    def __init__(self, wf: WorkflowDef, **inp: Any) -> None:
        self.issued = Issued(wf)
        super().__init__(wf, **inp)

    def feed(self, inp: DeciderInput) -> Decision:
        d = super().feed(inp)
        self.issued.after(d)
        return d


def test_map_elements_are_rebuilt_with_their_item_and_attempt() -> None:
    r = CheckedRun(invoices(), vendor="acme")
    r.answer("extract", {"lines": [{"n": i} for i in range(7)]})
    rng = random.Random(7)
    for _ in range(40):
        running = element_tasks(r)
        if not running:
            break
        i = rng.choice(sorted(running))
        t = running[i]
        at = r.s.clock_ms + 5
        if rng.random() < 0.3:  # a retriable failure: the element waits for its retry, then is issued
            r.feed(StepResult(RUN, "match", t.attempt, at, error_type="Boom", error="x", element=i))
            r.feed(TimerFired(RUN, r.s.next_due_ms() or at))
        elif rng.random() < 0.2:  # lost: its deadline re-issues it under the same key
            r.feed(TimerFired(RUN, r.s.steps["match"].deadline_ms or at))
        else:
            r.feed(StepResult(RUN, "match", t.attempt, at, output={"ok": i}, element=i))
    assert r.s.steps["match"].status in ("succeeded", "failed")


def test_a_loops_next_iteration_is_rebuilt_with_its_iteration() -> None:
    r = CheckedRun(critique(), topic="kafka")
    r.answer("draft", {"text": "v1"})
    r.answer("critique", {"score": 0.5, "feedback": "more"})
    (task,) = awaited_tasks(r.wf, r.s)
    assert (task.step, task.iteration) == ("draft", 1)


def test_a_step_waiting_for_its_retry_or_a_person_awaits_no_attempt() -> None:
    r = CheckedRun(invoices(), vendor="acme")
    r.answer("extract", error="Boom")  # retriable: waits for its backoff, not started at restore
    assert r.s.steps["extract"].status == "retry_wait"
    assert awaited_tasks(r.wf, r.s) == ()


def test_an_attempt_resumed_with_tool_answers_is_rebuilt_with_them() -> None:
    wf = tools.WF
    state = tools.waiting()
    assert awaited_tasks(wf, state) == ()  # waiting for a person: no attempt in flight
    issued = Issued(wf)
    d = decide(wf, state, Answer(tools.RUN, "pay", True, 1200, by="alice"))
    issued.after(d)
    assert d.state is not None
    (task,) = awaited_tasks(wf, d.state)
    assert task == d.tasks[0] and task.approvals and task.first_issued_ms == d.state.steps["pay"].scheduled_ms

"""Property tests of the decider: simulated run histories are folded, duplicated, replayed and reordered."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import (
    INPUT_TYPES,
    DeciderInput,
    RedriveRequested,
    RunEvent,
    RunRequested,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.state import ACTIVE, RunState

RUN = "run-p"
MAX_INPUTS = 60
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.1, "multiplier": 2, "max_backoff_s": 1, "jitter": 0.5}


def _wf(name: str, steps: list[dict[str, Any]], **extra: Any) -> WorkflowDef:
    for s in steps:
        s.setdefault("retry", _RETRY)
        s.setdefault("timeout_s", 1)
    return parse_workflow({"name": name, "steps": steps, "deadline_grace_s": 0.5, **extra})


WORKFLOWS: dict[str, WorkflowDef] = {
    "linear": _wf(
        "linear",
        [
            {"name": "a", "agent": "x", "next": "b"},
            {"name": "b", "agent": "x", "next": "c", "input": {"v": "steps.a.v"}},
            {"name": "c", "agent": "x"},
        ],
    ),
    "branch": _wf(
        "branch",
        [
            {
                "name": "a",
                "agent": "x",
                "next": "c",
                "branches": [
                    {"when": {"field": "route", "value": "left"}, "goto": "b"},
                    {"when": {"field": "v", "op": "gt", "value": 7}, "goto": "end:big"},
                ],
            },
            {"name": "b", "agent": "x", "next": "end:left"},
            {"name": "c", "agent": "x"},
        ],
        outcomes=["left", "big"],
    ),
    "fanout": _wf(
        "fanout",
        [
            {"name": "a", "agent": "x", "next": ["b", "c"]},
            {"name": "b", "agent": "x", "next": "d"},
            {"name": "c", "agent": "x", "next": "d"},
            {"name": "d", "agent": "x", "needs": ["b", "c"], "input": {"b": "steps.b.v", "c": "steps.c.v"}},
        ],
    ),
    "saga": _wf(
        "saga",
        [
            {"name": "a", "agent": "x", "compensate": "undo_a", "next": "b"},
            {"name": "b", "agent": "x", "next": ["c", "d"]},
            {"name": "c", "agent": "x", "compensate": "undo_c"},
            {"name": "d", "agent": "x", "compensate": "undo_d", "retry": {**_RETRY, "max_attempts": 2}},
        ],
    ),
}


def fold(wf: WorkflowDef, inputs: list[DeciderInput]) -> tuple[RunState | None, list[Decision]]:
    state: RunState | None = None
    decisions = []
    for event in inputs:
        d = decide(wf, state, event)
        decisions.append(d)
        state = d.state
    return state, decisions


def applied_events(decisions: list[Decision]) -> list[dict[str, Any]]:
    return [e.model_dump() for d in decisions if d.ignored is None for e in d.events]


def dump(state: RunState | None) -> dict[str, Any] | None:
    return state.model_dump() if state is not None else None


@st.composite
def histories(
    draw: st.DrawFn, names: tuple[str, ...] = tuple(WORKFLOWS), redrive: bool = True
) -> tuple[WorkflowDef, list[DeciderInput]]:
    """Simulate one run: answer outstanding tasks (ok / retriable / fatal), fire timers, maybe redrive."""
    wf = WORKFLOWS[draw(st.sampled_from(names))]
    first = RunRequested(RUN, wf.name, {"n": draw(st.integers(0, 3))}, at_ms=0)
    inputs: list[DeciderInput] = [first]
    d = decide(wf, None, first)
    assert d.state is not None
    state = d.state
    pending: list[StepTask] = list(d.tasks)  # every task sent and not yet answered (stale ones too)
    t = 0
    redrives = 0
    while len(inputs) < MAX_INPUTS:
        if state.is_terminal():
            if not (redrive and state.status == "quarantined" and redrives < 2 and draw(st.booleans())):
                break
            redrives += 1
            t += draw(st.sampled_from([0, 10, 1000]))
            event: DeciderInput = RedriveRequested(RUN, t)
        else:
            t += draw(st.sampled_from([0, 1, 60, 400, 1600]))
            actions = (["task"] if pending else []) + ["timer", "due"]
            action = draw(st.sampled_from(actions))
            if action == "task":
                task = pending.pop(draw(st.integers(0, len(pending) - 1)))
                outcome = draw(st.sampled_from(["ok", "retriable", "ok", "ok", "ok", "fatal"]))
                if outcome == "ok":
                    output = {"v": draw(st.integers(0, 9)), "route": draw(st.sampled_from(["left", "right"]))}
                    event = StepResult(RUN, task.step, task.attempt, t, kind=task.kind, output=output)
                else:
                    event = StepResult(
                        RUN,
                        task.step,
                        task.attempt,
                        t,
                        kind=task.kind,
                        error_type="Boom",
                        error=f"{outcome} error",
                        retriable=outcome == "retriable",
                    )
            else:
                due = state.next_due_ms()
                if action == "due" and due is not None:
                    t = max(t, due)
                event = TimerFired(RUN, t)
        inputs.append(event)
        d = decide(wf, state, event)
        assert d.state is not None
        state = d.state
        pending.extend(d.tasks)
    return wf, inputs


# -- a. determinism --------------------------------------------------------------------------------


@SETTINGS
@given(histories())
def test_folding_is_deterministic(history: tuple[WorkflowDef, list[DeciderInput]]) -> None:
    wf, inputs = history
    s1, d1 = fold(wf, inputs)
    s2, d2 = fold(wf, inputs)
    assert dump(s1) == dump(s2)
    assert [e.model_dump() for d in d1 for e in d.events] == [e.model_dump() for d in d2 for e in d.events]
    assert [t.model_dump() for d in d1 for t in d.tasks] == [t.model_dump() for d in d2 for t in d.tasks]
    assert [(d.ignored, d.quarantine) for d in d1] == [(d.ignored, d.quarantine) for d in d2]


# -- b. redelivery ---------------------------------------------------------------------------------


@SETTINGS
@given(histories(), st.data())
def test_redelivered_inputs_change_nothing(
    history: tuple[WorkflowDef, list[DeciderInput]], data: st.DataObject
) -> None:
    """Exact copies of requests and results, at any later position, are ignored.

    A timer is redelivered only while the run's clock has not passed its time (see
    test_decider.py::test_redelivered_timer_is_ignored for a timer redelivered after the clock moved), and
    redrive commands are operator actions without an identity of their own, so they are not duplicated.
    """
    wf, inputs = history
    original, original_decisions = fold(wf, inputs)
    dup = list(inputs)
    for _ in range(data.draw(st.integers(1, 6), label="copies")):
        i = data.draw(st.integers(0, len(dup) - 1), label="source")
        event = dup[i]
        if isinstance(event, RedriveRequested):
            continue
        j = data.draw(st.integers(i + 1, len(dup)), label="at")
        if isinstance(event, TimerFired):
            state, _ = fold(wf, dup[:j])
            if state is not None and state.clock_ms > event.at_ms:
                j = i + 1
        dup.insert(j, event)
    final, decisions = fold(wf, dup)
    assert sum(d.ignored is not None for d in decisions) == sum(
        d.ignored is not None for d in original_decisions
    ) + (len(dup) - len(inputs))
    assert dump(final) == dump(original)
    assert applied_events(decisions) == applied_events(original_decisions)
    assert [t.model_dump() for d in decisions for t in d.tasks] == [
        t.model_dump() for d in original_decisions for t in d.tasks
    ]


# -- c. replay from the recorded input events ------------------------------------------------------


def input_from_event(e: RunEvent) -> DeciderInput:
    """Rebuild the decider input that a recorded input event stands for."""
    if e.type == "run.requested":
        return RunRequested(e.run_id, e.workflow, e.data["input"], e.at_ms, e.tenant)
    if e.type == "step.succeeded":
        assert e.step is not None and e.attempt is not None and e.cost is not None
        return StepResult(
            e.run_id, e.step, e.attempt, e.at_ms, kind=e.data["kind"], output=e.data["output"], cost=e.cost
        )
    if e.type == "step.failed":
        assert e.step is not None and e.attempt is not None and e.cost is not None
        return StepResult(
            e.run_id,
            e.step,
            e.attempt,
            e.at_ms,
            kind=e.data["kind"],
            error_type=e.data["error_type"],
            error=e.data["error"],
            retriable=e.data["retriable"],
            cost=e.cost,
        )
    if e.type == "timer.fired":
        return TimerFired(e.run_id, e.at_ms)
    assert e.type == "run.redrive_requested"
    return RedriveRequested(e.run_id, e.at_ms)


@SETTINGS
@given(histories())
def test_recorded_input_events_replay_the_run(history: tuple[WorkflowDef, list[DeciderInput]]) -> None:
    wf, inputs = history
    final, decisions = fold(wf, inputs)
    # each applied decision logs exactly one input event, first; ignored inputs log only input.ignored
    for d in decisions:
        kinds = [e.type in INPUT_TYPES for e in d.events]
        if d.ignored is None:
            assert kinds[0] and not any(kinds[1:])
        else:
            assert [e.type for e in d.events] in ([], ["input.ignored"])
    log = [e for d in decisions for e in d.events if e.seq >= 0]
    recorded = [input_from_event(e) for e in log if e.type in INPUT_TYPES]
    replayed, replay_decisions = fold(wf, recorded)
    assert all(d.ignored is None for d in replay_decisions)
    assert dump(replayed) == dump(final)
    assert applied_events(replay_decisions) == [e.model_dump() for e in log]
    # re-deciding the original inputs, ignored ones included, gives the same log again
    _, again = fold(wf, inputs)
    assert applied_events(again) == [e.model_dump() for e in log]


# -- d. invariants on every intermediate state -----------------------------------------------------


@SETTINGS
@given(histories())
def test_invariants_hold_on_every_state(history: tuple[WorkflowDef, list[DeciderInput]]) -> None:
    wf, inputs = history
    state: RunState | None = None
    applied = 0
    attempts: dict[str, int] = {}
    outputs: dict[str, Any] = {}
    tasks: list[StepTask] = []
    for event in inputs:
        before = dump(state)
        d = decide(wf, state, event)
        assert dump(state) == before  # never mutated
        if d.ignored is not None:
            assert d.state is state
            assert all(e.seq == -1 for e in d.events)
            continue
        new = d.state
        assert new is not None
        applied += len(d.events)
        assert new.seq == applied
        assert [e.seq for e in d.events] == list(range(new.seq - len(d.events) + 1, new.seq + 1))
        assert set(attempts) <= set(new.steps)  # steps never disappear
        for name, st_ in new.steps.items():
            assert st_.attempt >= attempts.get(name, 0)
            attempts[name] = st_.attempt
            if name in outputs:
                assert st_.output == outputs[name]  # a recorded output never changes
            elif st_.status == "succeeded":
                outputs[name] = st_.output
            assert (st_.due_ms is None) or (st_.deadline_ms is None)
            assert st_.attempt - st_.retry_base <= wf.step(name).retry.max_attempts
        for task in d.tasks:
            assert task.attempt == new.steps[task.step].attempt or new.status != "running"
        if new.status == "completed":
            assert new.outcome in wf.outcomes
            # not all "succeeded": a redrive after compensation leaves the compensated steps as they are
            # (test_decider.py::test_redrive_after_compensation_does_not_complete_on_undone_steps)
            assert not any(s.status in ("failed", "cancelled", *ACTIVE) for s in new.steps.values())
        if new.is_terminal():
            assert new.next_due_ms() is None
        tasks.extend(d.tasks)
        state = new
    assert state is not None
    if state.is_terminal():
        # a terminal run emits nothing on further results, whatever they say, nor on timers
        for task in tasks:
            for result in (
                StepResult(RUN, task.step, task.attempt, 10**9, kind=task.kind, output={"late": True}),
                StepResult(
                    RUN, task.step, task.attempt, 10**9, kind=task.kind, error_type="E", retriable=False
                ),
            ):
                d = decide(wf, state, result)
                assert d.ignored is not None and d.state is state and d.tasks == ()
                assert [e.seq for e in d.events] == [-1]
        assert decide(wf, state, TimerFired(RUN, 10**9)).ignored is not None


# -- e. reordering parallel results ----------------------------------------------------------------

FAN = WORKFLOWS["fanout"]


@st.composite
def fan_prefix(draw: st.DrawFn) -> tuple[list[DeciderInput], int]:
    """Request, split, then some retriable failures of b and c each followed by the timer that retries it."""
    inputs: list[DeciderInput] = [
        RunRequested(RUN, "fanout", {}, 0),
        StepResult(RUN, "a", 1, 10, output={"v": 0}),
    ]
    state, _ = fold(FAN, inputs)
    t = 10
    attempts = {"b": 1, "c": 1}
    for step in draw(st.lists(st.sampled_from(["b", "c"]), max_size=4)):
        if attempts[step] >= 3:
            continue
        t += draw(st.integers(0, 500))
        failure = StepResult(RUN, step, attempts[step], t, error_type="Flaky", error="x")
        state = decide(FAN, state, failure).state
        assert state is not None
        due = state.steps[step].due_ms
        assert due is not None
        t = max(t, due)
        inputs += [failure, TimerFired(RUN, t)]
        state = decide(FAN, state, inputs[-1]).state
        assert state is not None
        attempts[step] += 1
    return inputs, t


@SETTINGS
@given(fan_prefix(), st.integers(0, 9), st.integers(0, 9), st.integers(0, 2000))
def test_parallel_results_commute(prefix: tuple[list[DeciderInput], int], vb: int, vc: int, dt: int) -> None:
    inputs, t = prefix
    state, _ = fold(FAN, inputs)
    assert state is not None
    at = t + dt
    rb = StepResult(RUN, "b", state.steps["b"].attempt, at, output={"v": vb})
    rc = StepResult(RUN, "c", state.steps["c"].attempt, at, output={"v": vc})
    s1, d1 = fold(FAN, [*inputs, rb, rc])
    s2, d2 = fold(FAN, [*inputs, rc, rb])
    assert s1 is not None and s2 is not None
    # the join starts once, on the second arrival, with the same input either way
    join1 = [t for d in d1 for t in d.tasks if t.step == "d"]
    join2 = [t for d in d2 for t in d.tasks if t.step == "d"]
    assert len(join1) == len(join2) == 1
    assert join1[0] == join2[0]
    assert join1[0].input == {"b": vb, "c": vc}
    # done_seq records the arrival order (it orders compensation), everything else is the same
    assert {s1.steps["b"].done_seq, s1.steps["c"].done_seq} == {
        s2.steps["b"].done_seq,
        s2.steps["c"].done_seq,
    }

    def without_done_seq(s: RunState) -> dict[str, Any]:
        out = s.model_dump()
        for step in out["steps"].values():
            step.pop("done_seq")
        return out

    assert without_done_seq(s1) == without_done_seq(s2)
    end = StepResult(RUN, "d", 1, at + 1, output={})
    f1, _ = fold(FAN, [*inputs, rb, rc, end])
    f2, _ = fold(FAN, [*inputs, rc, rb, end])
    assert f1 is not None and f2 is not None and f1.status == f2.status == "completed"
    assert without_done_seq(f1) == without_done_seq(f2)


@SETTINGS
@given(histories(names=("fanout",), redrive=False), st.data())
def test_swapping_simultaneous_branch_successes_commutes(
    history: tuple[WorkflowDef, list[DeciderInput]], data: st.DataObject
) -> None:
    """In a generated fan-out history, two adjacent successes of b and c in the same ms can be swapped."""
    wf, inputs = history

    def branch_success(x: DeciderInput) -> str | None:
        ok = isinstance(x, StepResult) and x.ok and x.kind == "run" and x.step in ("b", "c")
        return x.step if ok and isinstance(x, StepResult) else None

    pairs = [
        i
        for i in range(len(inputs) - 1)
        if {branch_success(inputs[i]), branch_success(inputs[i + 1])} == {"b", "c"}
    ]
    if not pairs:
        return
    i = data.draw(st.sampled_from(pairs))
    first, second = inputs[i], inputs[i + 1]
    assert isinstance(first, StepResult) and isinstance(second, StepResult)
    at = max(first.at_ms, second.at_ms)
    same_time = [*inputs[:i], _at(first, at), _at(second, at), *inputs[i + 2 :]]
    swapped = [*inputs[:i], _at(second, at), _at(first, at), *inputs[i + 2 :]]
    s1, _ = fold(wf, same_time)
    s2, _ = fold(wf, swapped)
    assert s1 is not None and s2 is not None
    d1, d2 = s1.model_dump(), s2.model_dump()
    for d in (d1, d2):
        for step in d["steps"].values():
            step.pop("done_seq")
    assert d1 == d2


def _at(r: StepResult, at: int) -> StepResult:
    return dataclasses.replace(r, at_ms=at)

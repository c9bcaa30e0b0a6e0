"""Properties of the decider with people in the loop: answers, signals, timers and cancels in any order.

Simulated runs of ``test_decider_people.WF`` where answers (from anyone, twice), signals, timers and a
cancel interleave with task results; every recorded history re-decides to the same state and events
(``calmrun.workflow.history``, what replay and the history check use).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmrun.workflow.decider import decide
from calmrun.workflow.events import (
    INPUT_TYPES,
    Answer,
    CancelRequested,
    DeciderInput,
    RunRequested,
    SignalReceived,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.history import fold as fold_history
from calmrun.workflow.history import inputs_from_events
from tests.workflow.test_decider_people import RUN, WF, events, run

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def histories(draw: st.DrawFn) -> list[DeciderInput]:
    """A run of WF where tasks, timers, answers (from anyone, twice), signals and a cancel interleave."""
    first = RunRequested(RUN, "people", {}, 0)
    inputs: list[DeciderInput] = [first]
    d = decide(WF, None, first)
    assert d.state is not None
    state = d.state
    pending: list[StepTask] = list(d.tasks)
    people: list[DeciderInput] = []
    t = 0
    while len(inputs) < 40 and not state.is_terminal():
        t += draw(st.sampled_from([0, 1, 300, 1500]))
        actions = ["timer", "answer", "answer", "signal", "signal", "cancel", "again"] + ["task"] * 4 * bool(
            pending
        )
        action = draw(st.sampled_from(actions))
        event: DeciderInput
        if action == "task":
            task = pending.pop(draw(st.integers(0, len(pending) - 1)))
            ok = draw(st.sampled_from([True, True, True, False]))
            event = StepResult(
                RUN,
                task.step,
                task.attempt,
                t,
                kind=task.kind,
                output={} if ok else None,
                error_type=None if ok else "Boom",
                retriable=draw(st.booleans()),
            )
        elif action == "timer":
            due = state.next_due_ms()
            event = TimerFired(RUN, max(t, due) if due is not None and draw(st.booleans()) else t)
        elif action == "answer":
            who = draw(st.sampled_from(["alice", "bob", "mallory", None]))
            event = Answer(RUN, "ok", draw(st.booleans()), t, who, draw(st.sampled_from([None, "why"])))
            people.append(event)
        elif action == "signal":
            event = SignalReceived(RUN, draw(st.sampled_from(["paid", "other"])), t, {"amount": 1})
            people.append(event)
        elif action == "cancel":
            event = CancelRequested(RUN, t, "stop", "ops")
            people.append(event)
        elif people:  # the same person's input delivered again, later
            event = draw(st.sampled_from(people))
        else:
            continue
        inputs.append(event)
        d = decide(WF, state, event)
        assert d.state is not None
        state = d.state
        pending.extend(d.tasks)
    return inputs


@SETTINGS
@given(histories())
def test_recorded_history_re_decides_to_the_same_run(inputs: list[DeciderInput]) -> None:
    final, decisions = run(WF, inputs)
    log = [e for d in decisions if d.ignored is None for e in d.events]
    for d in decisions:  # each applied decision records its input first, once
        kinds = [e.type in INPUT_TYPES for e in d.events]
        assert (kinds[0] and not any(kinds[1:])) if d.ignored is None else events(d) == ["input.ignored"]
    replayed, replay_log = fold_history(WF, inputs_from_events(log))
    assert replayed is not None and final is not None
    assert replayed.model_dump() == final.model_dump()
    assert [e.model_dump() for e in replay_log] == [e.model_dump() for e in log]


@SETTINGS
@given(histories(), st.data())
def test_an_answer_or_cancel_delivered_again_changes_nothing(
    inputs: list[DeciderInput], data: st.DataObject
) -> None:
    """A copy of an applied answer, signal-free cancel or answer after cancel, anywhere later, is ignored."""
    final, decisions = run(WF, inputs)
    applied = [
        i
        for i, (inp, d) in enumerate(zip(inputs, decisions, strict=True))
        if isinstance(inp, Answer | CancelRequested) and d.ignored is None
    ]
    if not applied:
        return
    i = data.draw(st.sampled_from(applied))
    j = data.draw(st.integers(i + 1, len(inputs)))
    copied = [*inputs[:j], inputs[i], *inputs[j:]]
    again, again_decisions = run(WF, copied)
    assert again_decisions[j].ignored is not None
    assert again is not None and final is not None and again.model_dump() == final.model_dump()


@SETTINGS
@given(histories())
def test_one_answer_per_wait_and_nothing_runs_after_cancel(inputs: list[DeciderInput]) -> None:
    _, decisions = run(WF, inputs)
    log = [e for d in decisions if d.ignored is None for e in d.events]
    ends = [
        e.type
        for e in log
        if e.step == "ok" and e.type in ("step.approved", "step.rejected", "step.timed_out")
    ]
    assert len(ends) <= 1  # an answer or the timeout wins, never both
    cancel = next((e.seq for e in log if e.type == "run.cancel_requested"), None)
    if cancel is not None:
        after = [e for e in log if e.seq > cancel]
        assert not [e for e in after if e.type in ("step.scheduled", "step.waiting", "step.approved")]
        undo = [e.step for e in after if e.type == "step.compensation_scheduled"]
        assert undo == sorted(undo, key=undo.index)  # one step's retries follow it, then the next
        if "b" in undo and "a" in undo:
            assert undo.index("b") < undo.index("a")  # b succeeded after a: undone first


@SETTINGS
@given(histories(), st.integers(0, 3000))
def test_an_answer_and_a_timer_in_either_order_both_replay(inputs: list[DeciderInput], dt: int) -> None:
    """Whichever of an approval and the timeout comes first wins; both orders are valid histories."""
    s, _ = run(WF, inputs[:2] if len(inputs) > 1 else inputs)
    if s is None or s.steps.get("ok") is None or s.steps["ok"].status != "waiting":
        return
    due = s.steps["ok"].due_ms
    assert due is not None
    answer, timer = Answer(RUN, "ok", True, due + dt, "bob"), TimerFired(RUN, due + dt)
    for order in ([answer, timer], [timer, answer]):
        final, decisions = run(WF, [*inputs[:2], *order])
        log = [e for d in decisions if d.ignored is None for e in d.events]
        replayed, _ = fold_history(WF, inputs_from_events(log))
        assert final is not None and replayed is not None and replayed.model_dump() == final.model_dump()
        won = "step.approved" if order[0] is answer else "step.timed_out"
        assert won in [e.type for e in log]

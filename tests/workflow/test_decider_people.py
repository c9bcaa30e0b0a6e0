"""The decider with people in the loop: approval and wait steps, signals, cancel.

Unit cases pin each rule; the property tests simulate runs where answers, signals, timers and cancels
arrive in any order, twice, late, and check that every recorded history re-decides to the same state and
events (``calmrun.workflow.history``, what replay and the history check use).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmrun.errors import ConfigError, ErrorKind
from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import (
    INPUT_TYPES,
    Answer,
    CancelRequested,
    DeciderInput,
    RedriveRequested,
    RunRequested,
    SignalReceived,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.history import fold as fold_history
from calmrun.workflow.history import inputs_from_events
from calmrun.workflow.state import RunState

RUN = "run-h"
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _wf(**approval: Any) -> WorkflowDef:
    return parse_workflow(
        {
            "name": "people",
            "outcomes": ["expired", "rejected", "unpaid"],
            "steps": [
                {"name": "a", "agent": "x", "compensate": "undo_a", "next": "ok", "timeout_s": 1},
                {
                    "name": "ok",
                    "kind": "approval",
                    "approvers": ["alice", "bob"],
                    "timeout_s": 2,
                    "on_timeout": "end:expired",
                    "branches": [{"when": {"field": "approved", "value": False}, "goto": "end:rejected"}],
                    "next": ["pay", "b"],
                    **approval,
                },
                {"name": "pay", "kind": "wait", "signal": "paid", "timeout_s": 3, "on_timeout": "end:unpaid"},
                {"name": "b", "agent": "x", "compensate": "undo_b", "timeout_s": 1, "next": "c"},
                {"name": "c", "agent": "x", "needs": ["pay", "b"], "input": {"paid": "steps.pay.amount"}},
            ],
        }
    )


WF = _wf()


def run(wf: WorkflowDef, inputs: list[DeciderInput]) -> tuple[RunState | None, list[Decision]]:
    state: RunState | None = None
    out = []
    for inp in inputs:
        d = decide(wf, state, inp)
        out.append(d)
        state = d.state
    return state, out


def started(wf: WorkflowDef = WF) -> RunState:
    s, _ = run(wf, [RunRequested(RUN, wf.name, {}, 1000), StepResult(RUN, "a", 1, 1100, output={})])
    assert s is not None and s.steps["ok"].status == "waiting"
    return s


def events(d: Decision) -> list[str]:
    return [e.type for e in d.events]


# -- definitions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ({"name": "w", "kind": "approval", "agent": "x"}, "kind approval takes no agent"),
        ({"name": "w", "kind": "wait"}, "needs `signal`"),
        ({"name": "w", "kind": "wait", "signal": "s", "approvers": ["a"]}, "takes no approvers"),
        ({"name": "w", "agent": "x", "on_timeout": "end:completed"}, "kind agent takes no on_timeout"),
        ({"name": "w", "kind": "approval", "on_timeout": "end:expired"}, "'expired' is not in outcomes"),
        ({"name": "w"}, "an agent step needs `agent`"),
    ],
)
def test_step_kinds_are_validated(step: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_workflow({"name": "k", "steps": [step]})


def test_a_wait_without_timeout_waits_without_a_timer() -> None:
    wf = parse_workflow({"name": "k", "steps": [{"name": "w", "kind": "approval"}]})
    d = decide(wf, None, RunRequested(RUN, "k", {}, 5))
    assert d.state is not None and d.state.steps["w"].status == "waiting"
    assert d.state.next_due_ms() is None and d.tasks == ()
    assert parse_workflow(wf.model_dump()) == wf  # a dumped definition keeps "no timeout"


# -- approvals -------------------------------------------------------------------------------------


def test_waiting_is_state_with_a_timer_and_no_task() -> None:
    s = started()
    st_ = s.steps["ok"]
    assert (st_.status, st_.due_ms, st_.deadline_ms) == ("waiting", 1100 + 2000, None)
    assert s.next_due_ms() == 3100


def test_approval_routes_on_the_answer_and_records_who() -> None:
    d = decide(WF, started(), Answer(RUN, "ok", True, 1500, "alice", "fine"))
    assert events(d)[:2] == ["step.approved", "run.routed"]
    assert d.events[0].data == {"by": "alice", "comment": "fine"}
    assert d.state is not None
    assert d.state.steps["ok"].output == {"approved": True, "by": "alice", "comment": "fine"}
    assert {t.step for t in d.tasks} == {"b"} and d.state.steps["pay"].status == "waiting"


def test_rejection_routes_by_branch_or_on_reject() -> None:
    d = decide(WF, started(), Answer(RUN, "ok", False, 1500, "bob", "no"))
    assert d.state is not None and (d.state.status, d.state.outcome) == ("completed", "rejected")
    wf = _wf(on_reject="end:expired")
    d = decide(wf, started(wf), Answer(RUN, "ok", False, 1500, "bob"))
    assert d.state is not None and d.state.outcome == "expired"
    assert d.events[1].data == {"to": ["end:expired"], "by": "on_reject"}


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (Answer(RUN, "ok", True, 1500, "mallory"), "'mallory' may not answer 'ok'"),
        (Answer(RUN, "nope", True, 1500, "alice"), "'nope' is not an approval step"),
        (Answer(RUN, "a", True, 1500, "alice"), "'a' is not an approval step"),
    ],
)
def test_answers_that_do_not_count_are_ignored_with_why(answer: Answer, why: str) -> None:
    s = started()
    d = decide(WF, s, answer)
    assert d.ignored is not None and why in d.ignored
    assert events(d) == ["input.ignored"] and d.events[0].data["reason"] == d.ignored
    assert d.state is s


def test_a_second_answer_and_an_early_one_are_ignored() -> None:
    s, _ = run(WF, [RunRequested(RUN, "people", {}, 1000)])
    d = decide(WF, s, Answer(RUN, "ok", True, 1001, "alice"))
    assert d.ignored == "step 'ok' is not waiting for an answer (it is not started)"
    d = decide(WF, started(), Answer(RUN, "ok", True, 1500, "alice"))
    again = decide(WF, d.state, Answer(RUN, "ok", False, 1600, "bob"))
    assert again.ignored == "a second answer: 'ok' was already approved by 'alice'"


def test_timeout_takes_on_timeout_and_a_late_answer_is_ignored() -> None:
    d = decide(WF, started(), TimerFired(RUN, 3100))
    assert events(d) == ["timer.fired", "step.timed_out", "run.routed", "run.completed"]
    assert d.state is not None and (d.state.outcome, d.state.steps["ok"].status) == ("expired", "timed_out")
    late = decide(WF, d.state, Answer(RUN, "ok", True, 3200, "alice"))
    assert late.ignored is not None and "timed_out" in late.ignored


def test_timeout_without_on_timeout_quarantines_with_wait_timeout() -> None:
    wf = parse_workflow({"name": "k", "steps": [{"name": "w", "kind": "approval", "timeout_s": 1}]})
    s, ds = run(wf, [RunRequested(RUN, "k", {}, 0), TimerFired(RUN, 1000)])
    assert s is not None and (s.status, s.error_type) == ("quarantined", ErrorKind.WAIT_TIMEOUT)
    assert ds[-1].quarantine is not None


# -- signals ---------------------------------------------------------------------------------------


def approved() -> RunState:
    d = decide(WF, started(), Answer(RUN, "ok", True, 1500, "alice"))
    assert d.state is not None
    return d.state


def test_a_signal_resumes_its_wait_with_the_payload() -> None:
    d = decide(WF, approved(), SignalReceived(RUN, "paid", 1600, {"amount": 12}))
    assert events(d) == ["signal.received", "step.signalled", "run.routed"]
    assert d.state is not None and d.state.steps["pay"].output == {"amount": 12}


def test_a_signal_before_its_wait_is_kept_until_the_wait_starts() -> None:
    early = decide(WF, started(), SignalReceived(RUN, "paid", 1200, {"amount": 7}))
    assert early.ignored is None and early.state is not None
    assert early.state.signals == {"paid": [{"amount": 7}]}
    d = decide(WF, early.state, Answer(RUN, "ok", True, 1500, "alice"))
    assert d.state is not None and d.state.steps["pay"].status == "succeeded"
    assert d.state.steps["pay"].output == {"amount": 7} and d.state.signals == {}
    assert "step.signalled" in events(d)


def test_a_signal_no_step_waits_for_is_ignored() -> None:
    d = decide(WF, started(), SignalReceived(RUN, "shipped", 1200, {}))
    assert d.ignored == "no step of this run waits for signal 'shipped', now or later"


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel_compensates_succeeded_steps_in_reverse_order_and_ends_cancelled() -> None:
    s = decide(WF, approved(), StepResult(RUN, "b", 1, 1700, output={})).state
    d = decide(WF, s, CancelRequested(RUN, 1800, "customer withdrew", "ops"))
    assert events(d) == [
        "run.cancel_requested",
        "step.cancelled",  # pay, waiting
        "step.compensation_scheduled",
    ]
    assert d.quarantine is None and d.state is not None and d.state.status == "cancelled"
    assert [t.step for t in d.tasks] == ["b"] and d.state.compensations == ["b", "a"]
    d = decide(WF, d.state, StepResult(RUN, "b", 2, 1900, kind="compensate", output={}))
    assert [t.step for t in d.tasks] == ["a"]
    d = decide(WF, d.state, StepResult(RUN, "a", 2, 2000, kind="compensate", output={}))
    assert events(d)[-1] == "run.cancelled"
    assert d.events[-1].data["compensated"] == ["a", "b"]
    assert d.state is not None and d.state.is_terminal() and d.state.status == "cancelled"
    again = decide(WF, d.state, CancelRequested(RUN, 2100, "again"))
    assert again.ignored == "cancel needs a running run; this one is cancelled"


def test_cancel_while_waiting_ends_at_once_without_compensations() -> None:
    wf = parse_workflow({"name": "k", "steps": [{"name": "w", "kind": "approval", "timeout_s": 1}]})
    s, ds = run(wf, [RunRequested(RUN, "k", {}, 0), CancelRequested(RUN, 10, "stop")])
    assert events(ds[-1]) == ["run.cancel_requested", "step.cancelled", "run.cancelled"]
    assert s is not None and s.is_terminal() and s.next_due_ms() is None


# -- properties ------------------------------------------------------------------------------------


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


def test_a_redrive_after_a_wait_timeout_waits_again_and_replays() -> None:
    wf = parse_workflow(
        {
            "name": "k",
            "steps": [
                {"name": "w", "kind": "approval", "timeout_s": 1, "next": "x"},
                {"name": "x", "agent": "x"},
            ],
        }
    )
    inputs: list[DeciderInput] = [
        RunRequested(RUN, "k", {}, 0),
        TimerFired(RUN, 1000),  # no answer: WaitTimeout, quarantined
        RedriveRequested(RUN, 5000),
        Answer(RUN, "w", True, 5100, "ann"),
    ]
    s, ds = run(wf, inputs)
    assert all(d.ignored is None for d in ds)
    assert s is not None and s.steps["w"].attempt == 2 and s.steps["w"].status == "succeeded"
    assert [t.step for t in ds[-1].tasks] == ["x"]
    log = [e for d in ds for e in d.events]
    replayed, replay_log = fold_history(wf, inputs_from_events(log))
    assert replayed is not None and replayed.model_dump() == s.model_dump()
    assert [e.model_dump() for e in replay_log] == [e.model_dump() for e in log]

"""The decider with people in the loop: approval and wait steps, signals, cancel.

Unit cases pin each rule; ``test_decider_people_properties`` simulates runs where answers, signals,
timers and cancels arrive in any order, twice, late.
"""

from __future__ import annotations

from typing import Any

import pytest

from calmrun.errors import ConfigError, ErrorKind
from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import (
    Answer,
    CancelRequested,
    DeciderInput,
    RedriveRequested,
    RunRequested,
    SignalReceived,
    StepResult,
    TimerFired,
)
from calmrun.workflow.history import fold as fold_history
from calmrun.workflow.history import inputs_from_events
from calmrun.workflow.state import RunState

RUN = "run-h"


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
    assert events(d) == ["signal.received", "step.signalled"]  # pay goes to the end: b and c are still to run
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
    assert again.ignored == "cancel needs a running or quarantined run; this one is cancelled"


def test_cancel_while_waiting_ends_at_once_without_compensations() -> None:
    wf = parse_workflow({"name": "k", "steps": [{"name": "w", "kind": "approval", "timeout_s": 1}]})
    s, ds = run(wf, [RunRequested(RUN, "k", {}, 0), CancelRequested(RUN, 10, "stop")])
    assert events(ds[-1]) == ["run.cancel_requested", "step.cancelled", "run.cancelled"]
    assert s is not None and s.is_terminal() and s.next_due_ms() is None


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


def test_cancel_closes_a_quarantined_run_for_good() -> None:
    wf = parse_workflow({"name": "k", "steps": [{"name": "w", "kind": "approval", "timeout_s": 1}]})
    s, ds = run(
        wf, [RunRequested(RUN, "k", {}, 0), TimerFired(RUN, 1000), CancelRequested(RUN, 2000, "give up")]
    )
    assert events(ds[-1]) == ["run.cancel_requested", "run.cancelled"]
    assert s is not None and s.status == "cancelled" and s.error is not None and "WaitTimeout" in s.error
    assert (
        decide(wf, s, RedriveRequested(RUN, 3000)).ignored
        == "redrive needs a quarantined run; this one is cancelled"
    )

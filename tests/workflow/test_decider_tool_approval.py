"""The decider with a tool call of an agent waiting for a person (``requires_approval``).

An attempt that pauses on a tool call reports ``ToolApprovalPending`` with the pending calls; the step
waits (no deadline, no task); ``approve``/``reject`` re-issue the SAME attempt with the answers on the task.
Unit cases pin each rule; the properties simulate tasks, answers (from anyone, twice), timers and a cancel
in any order, and check that the recorded history re-decides to the same run.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmrun.errors import ErrorKind
from calmrun.workflow.decider import decide, expired
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import (
    INPUT_TYPES,
    Answer,
    CancelRequested,
    DeciderInput,
    RunRequested,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.history import fold as fold_history
from calmrun.workflow.history import inputs_from_events
from calmrun.workflow.state import RunState
from tests.workflow.test_decider_people import events, run

RUN = "run-t"
WF: WorkflowDef = parse_workflow(
    {
        "name": "tools",
        "steps": [
            {
                "name": "pay",
                "agent": "payer",
                "tool_approvers": ["alice"],
                "timeout_s": 1,
                "next": "end:completed",
            }
        ],
    }
)
CALL = {"tool_call_id": "c1", "tool": "refund", "args": {"order": 7}}
CALL2 = {"tool_call_id": "c2", "tool": "refund", "args": {"order": 8}}
CALL3 = {"tool_call_id": "c3", "tool": "refund", "args": {"order": 9}, "position": 5}


def paused(attempt: int, at: int, *calls: dict[str, Any]) -> StepResult:
    return StepResult(
        RUN,
        "pay",
        attempt,
        at,
        output={"tool_approval": list(calls or (CALL,))},
        error_type=ErrorKind.TOOL_APPROVAL_PENDING.value,
        error="waits",
        retriable=False,
    )


def waiting() -> RunState:
    s, ds = run(WF, [RunRequested(RUN, "tools", {"x": 1}, 1000), paused(1, 1100)])
    assert s is not None and all(d.ignored is None for d in ds)
    return s


def test_a_paused_attempt_waits_with_its_tool_call_and_no_deadline() -> None:
    s, ds = run(WF, [RunRequested(RUN, "tools", {"x": 1}, 1000), paused(1, 1100)])
    assert s is not None
    st_ = s.steps["pay"]
    assert st_.status == "waiting" and st_.deadline_ms is None and st_.due_ms is None and st_.attempt == 1
    assert st_.tool_approval == {"pending": [CALL], "answers": {}}
    assert events(ds[1]) == ["step.failed", "step.waiting"]
    w = ds[1].events[1].data
    assert w["kind"] == "tool_approval" and w["approvers"] == ["alice"] and w["tool_calls"] == [CALL]
    assert ds[1].tasks == () and s.next_due_ms() is None and expired(s, 10**12) == []
    assert decide(WF, s, TimerFired(RUN, 10**9)).ignored == "nothing is due"


def test_an_approval_reissues_the_same_attempt_with_the_answer() -> None:
    d = decide(WF, waiting(), Answer(RUN, "pay", True, 2000, "alice", "fine"))
    assert d.ignored is None and d.state is not None
    assert events(d) == ["step.approved", "step.reissued"]
    (task,) = d.tasks
    assert task.attempt == 1 and task.idempotency_key == f"{RUN}/pay/run/1" and task.input == {"x": 1}
    assert task.approvals == {"c1": {"approved": True, "by": "alice", "comment": "fine"}}
    assert task.issued_ms == 2000 and task.first_issued_ms == 1000  # the journal is read from the first issue
    assert d.state.steps["pay"].status == "scheduled" and d.state.steps["pay"].deadline_ms is not None
    # the re-issued attempt's result counts; a deadline re-issue carries the answer too
    again = decide(WF, d.state, TimerFired(RUN, 10**7))
    assert [t.approvals for t in again.tasks] == [task.approvals]
    done = decide(WF, d.state, StepResult(RUN, "pay", 1, 3000, output={"ok": True}))
    assert done.state is not None and done.state.status == "completed"


def test_a_rejection_reissues_too_and_the_agent_gets_it() -> None:
    d = decide(WF, waiting(), Answer(RUN, "pay", False, 2000, "alice", "no"))
    (task,) = d.tasks
    assert events(d) == ["step.rejected", "step.reissued"]
    assert task.approvals == {"c1": {"approved": False, "by": "alice", "comment": "no"}}


def test_who_may_answer_a_second_answer_and_an_answer_after_cancel_are_ignored() -> None:
    s = waiting()
    assert "may not answer" in (decide(WF, s, Answer(RUN, "pay", True, 2000, "mallory")).ignored or "")
    d = decide(WF, s, Answer(RUN, "pay", True, 2000, "alice"))
    assert d.state is not None
    assert "second answer" in (decide(WF, d.state, Answer(RUN, "pay", False, 2001, "alice")).ignored or "")
    c = decide(WF, s, CancelRequested(RUN, 2000, "gone"))
    assert c.state is not None and c.state.status == "cancelled"
    assert c.state.steps["pay"].status == "cancelled"
    assert decide(WF, c.state, Answer(RUN, "pay", True, 2001, "alice")).ignored is not None


def test_a_second_pause_keeps_the_first_answer() -> None:
    d = decide(WF, waiting(), Answer(RUN, "pay", True, 2000, "alice"))
    assert d.state is not None
    p = decide(WF, d.state, paused(1, 2100, CALL2))
    assert p.state is not None and p.state.steps["pay"].status == "waiting"
    a = decide(WF, p.state, Answer(RUN, "pay", False, 2200, "alice"))
    (task,) = a.tasks
    assert task.approvals is not None and set(task.approvals) == {"c1", "c2"}
    assert task.approvals["c1"]["approved"] and not task.approvals["c2"]["approved"]


def test_an_answer_names_the_call_it_answers() -> None:
    d = decide(WF, waiting(), Answer(RUN, "pay", True, 2000, "alice", None, "c1"))
    assert d.state is not None and [t.approvals for t in d.tasks] == [
        {"c1": {"approved": True, "by": "alice", "comment": None}}
    ]
    p = decide(WF, d.state, paused(1, 2100, CALL2))
    assert p.state is not None  # the same answer delivered again after the next pause: not for c2
    assert "does not wait on tool call 'c1'" in (
        decide(WF, p.state, Answer(RUN, "pay", True, 2200, "alice", None, "c1")).ignored or ""
    )
    two = decide(WF, waiting(), paused(1, 1100, CALL, CALL2))
    assert two.ignored is not None  # a result for a step that waits is late: not the attempt in flight
    s, _ = run(WF, [RunRequested(RUN, "tools", {}, 1000), paused(1, 1100, CALL, CALL2)])
    assert s is not None
    one = decide(WF, s, Answer(RUN, "pay", True, 2000, "alice", None, "c2"))
    assert one.state is not None and one.tasks == () and one.state.steps["pay"].status == "waiting"
    both = decide(WF, one.state, Answer(RUN, "pay", False, 2001, "alice", None, "c1"))
    (task,) = both.tasks
    assert task.approvals is not None and set(task.approvals) == {"c1", "c2"}


def test_an_answer_carries_what_the_pause_reported() -> None:
    s, _ = run(WF, [RunRequested(RUN, "tools", {}, 1000), paused(1, 1100, CALL3)])
    assert s is not None
    (task,) = decide(WF, s, Answer(RUN, "pay", True, 2000, "alice")).tasks
    assert task.approvals == {"c3": {"approved": True, "by": "alice", "comment": None, "billed": 5}}


def test_a_malformed_pause_is_a_failure() -> None:
    pending = ErrorKind.TOOL_APPROVAL_PENDING.value
    s, _ = run(
        WF,
        [
            RunRequested(RUN, "tools", {}, 1000),
            StepResult(RUN, "pay", 1, 1100, error_type=pending, retriable=False),
        ],
    )
    assert s is not None and s.status == "quarantined"


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def histories(draw: st.DrawFn) -> list[DeciderInput]:
    """A run of WF where its tasks pause (on new tool calls), succeed or fail, and answers (from anyone,
    twice), timers and a cancel interleave."""
    first = RunRequested(RUN, "tools", {}, 0)
    inputs: list[DeciderInput] = [first]
    d = decide(WF, None, first)
    assert d.state is not None
    state = d.state
    pending: list[StepTask] = list(d.tasks)
    calls = 0
    t = 0
    while len(inputs) < 30 and not state.is_terminal():
        t += draw(st.sampled_from([0, 1, 300, 1500]))
        action = draw(st.sampled_from(["timer", "answer", "answer", "cancel"] + ["task"] * 4 * bool(pending)))
        event: DeciderInput
        if action == "task":
            task = pending.pop(draw(st.integers(0, len(pending) - 1)))
            how = draw(st.sampled_from(["pause", "pause", "ok", "fail"]))
            if how == "pause":
                calls += 1
                call = {"tool_call_id": f"c{calls}", "tool": "refund", "args": {"n": calls}}
                event = paused(task.attempt, t, call)
            else:
                ok = how == "ok"
                event = StepResult(
                    RUN, "pay", task.attempt, t, output={} if ok else None, error_type=None if ok else "Boom"
                )
        elif action == "timer":
            event = TimerFired(RUN, t)
        elif action == "answer":
            held = state.steps["pay"].tool_approval or {}
            ids = [c["tool_call_id"] for c in held.get("pending") or []] + [f"c{calls}", None]
            event = Answer(
                RUN,
                "pay",
                draw(st.booleans()),
                t,
                draw(st.sampled_from(["alice", "alice", "mallory"])),
                None,
                draw(st.sampled_from(ids)),
            )
        else:
            event = CancelRequested(RUN, t, "stop")
        d = decide(WF, state, event)
        inputs.append(event)
        if d.ignored is None:
            assert d.state is not None
            state = d.state
            pending.extend(d.tasks)
    return inputs


@SETTINGS
@given(histories())
def test_recorded_history_re_decides_to_the_same_run(inputs: list[DeciderInput]) -> None:
    final, decisions = run(WF, inputs)
    log = [e for d in decisions if d.ignored is None for e in d.events]
    for d in decisions:
        kinds = [e.type in INPUT_TYPES for e in d.events]
        assert (kinds[0] and not any(kinds[1:])) if d.ignored is None else events(d) == ["input.ignored"]
    replayed, replay_log = fold_history(WF, inputs_from_events(log))
    assert replayed is not None and final is not None
    assert replayed.model_dump() == final.model_dump()
    assert [e.model_dump() for e in replay_log] == [e.model_dump() for e in log]


@SETTINGS
@given(histories())
def test_one_answer_per_pause_the_same_attempt_and_nothing_after_cancel(inputs: list[DeciderInput]) -> None:
    _, decisions = run(WF, inputs)
    answered, pauses, cancelled = 0, 0, False
    for inp, d in zip(inputs, decisions, strict=True):
        if d.ignored is not None:
            continue
        if isinstance(inp, Answer):
            answered += 1
            assert not cancelled and inp.by == "alice" and answered <= pauses
            # an answer re-issues the attempt the pause reported, with every answer so far
            (task,) = d.tasks
            assert task.approvals is not None and len(task.approvals) == answered
            assert d.state is not None and task.attempt == d.state.steps["pay"].attempt
        if isinstance(inp, StepResult) and inp.error_type == ErrorKind.TOOL_APPROVAL_PENDING.value:
            pauses += 1
            assert d.tasks == ()
        if isinstance(inp, CancelRequested):
            cancelled = True
        if cancelled:
            assert d.tasks == ()


@SETTINGS
@given(histories(), st.data())
def test_an_answer_naming_its_call_delivered_again_changes_nothing(
    inputs: list[DeciderInput], data: st.DataObject
) -> None:
    final, decisions = run(WF, inputs)
    applied = [
        i
        for i, (inp, d) in enumerate(zip(inputs, decisions, strict=True))
        if isinstance(inp, Answer) and inp.tool_call_id is not None and d.ignored is None
    ]
    if not applied:
        return
    i = data.draw(st.sampled_from(applied))
    j = data.draw(st.integers(i + 1, len(inputs)))
    copied = [*inputs[:j], inputs[i], *inputs[j:]]
    again, again_decisions = run(WF, copied)
    assert again_decisions[j].ignored is not None
    assert again is not None and final is not None and again.model_dump() == final.model_dump()

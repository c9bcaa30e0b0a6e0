"""Commands held for a run whose version is not served here: decided (without the definition), logged as
notes, and put back by recorded replay, which compares the whole state, ``held`` included."""

from __future__ import annotations

import json

from calmrun.replay.recorded import replay_recorded
from calmrun.replay.snapshot import Snapshot
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import (
    CommandHeld,
    HeldReleased,
    RedriveRequested,
    RunEvent,
    RunRequested,
    StepResult,
)
from calmrun.workflow.state import RunState

WF = parse_workflow(
    {"name": "h", "steps": [{"name": "a", "agent": "x", "next": "b"}, {"name": "b", "agent": "x"}]}
)
REDRIVE = {"command": "redrive", "run_id": "r", "workflow": "h"}


def _run() -> tuple[RunState, list[RunEvent]]:
    d = decide(WF, None, RunRequested("r", "h", {}, 1000))
    assert d.state is not None
    return d.state, list(d.events)


def test_a_held_command_is_kept_in_order_and_logged_as_a_note_without_moving_the_seq() -> None:
    state, _ = _run()
    d1 = decide(None, state, CommandHeld("r", 1100, REDRIVE, "pin h v1 not served"))
    assert d1.state is not None and d1.ignored is None
    d2 = decide(None, d1.state, CommandHeld("r", 1200, {**REDRIVE, "by": "ops"}, "again"))
    assert d2.state is not None
    assert [json.loads(e)["at_ms"] for e in d2.state.held] == [1100, 1200]
    assert d2.state.seq == state.seq and state.held == []  # the input state is never changed
    (note,) = d2.events
    assert (note.type, note.seq, note.data["command"], note.data["held"]) == ("input.held", -1, "redrive", 2)
    assert note.data["after_seq"] == state.seq
    released = decide(None, d2.state, HeldReleased("r", 1300))
    assert released.state is not None and [json.loads(e)["at_ms"] for e in released.state.held] == [1200]
    assert released.events[0].type == "input.released" and released.events[0].seq == -1


def test_releasing_with_nothing_held_is_ignored() -> None:
    state, _ = _run()
    d = decide(None, state, HeldReleased("r", 1100))
    assert d.ignored is not None and d.state == state and d.events[0].type == "input.ignored"


def test_recorded_replay_rebuilds_held_commands_and_compares_them() -> None:
    state, events = _run()
    notes: list[RunEvent] = []
    d = decide(WF, state, StepResult("r", "a", 1, 1050, output={"ok": 1}))
    assert d.state is not None
    state, events = d.state, [*events, *d.events]
    for inp in (
        CommandHeld("r", 1100, REDRIVE, "x"),
        CommandHeld("r", 1150, REDRIVE, "y"),
        HeldReleased("r", 1200),
    ):
        h = decide(None, state, inp)
        assert h.state is not None
        state, notes = h.state, [*notes, *h.events]
    released = decide(WF, state, RedriveRequested("r", 1200))  # the released command: this run is running
    assert released.ignored is not None
    assert len(state.held) == 1
    ok = replay_recorded(WF, Snapshot(run_id="r", state=state, events=events, notes=notes))
    assert ok.verdict == "converged", ok.divergence
    # without the notes the replay cannot make the held command: the whole state is compared
    bad = replay_recorded(WF, Snapshot(run_id="r", state=state, events=events))
    assert bad.verdict == "diverged" and bad.divergence is not None and "held" in bad.divergence.reason

"""An operator's commands on a whole run: redrive, migrate, cancel, and holding commands for later.

- Redrive (``calmrun dlq redrive``) of a quarantined run re-issues its failed and cancelled steps with a
  fresh retry budget; a run whose steps were compensated cannot continue and is refused.
- Migrate (``calmrun deploy check --migrate``) pins a running run to another definition, only if the run
  is still at the seq that was checked.
- Cancel (``CancelRequested``) of a running run records ``run.cancel_requested``, cancels its active
  steps and compensates its succeeded steps in reverse order (the quarantine's saga, with no dead
  letter): the run ends ``cancelled`` with ``run.cancelled`` once the last compensation is done. A
  quarantined run (its saga ran at the quarantine) is closed for good the same way: no redrive after.
- Hold and release: a command for a run pinned to a version not served here is kept in
  ``RunState.held`` (``CommandHeld``), and taken out (``HeldReleased``) by a worker that serves it, which
  then decides it. Both are decided without the definition and logged as notes (seq -1).

Pure, as the decider is: no I/O, no clock.
"""

from __future__ import annotations

import json
from typing import Any

from calmrun.workflow.events import CancelRequested, CommandHeld, HeldInput, MigrateRequested, RunEvent
from calmrun.workflow.state import RunState
from calmrun.workflow.transitions import Decision, Transitions

CANCELLABLE = ("running", "quarantined", "over_budget")


def redrive(t: Transitions, by: str | None = None) -> bool:
    s = t.s
    if s.status not in ("quarantined", "over_budget") or s.compensations:
        t.why = f"redrive needs a quarantined run; this one is {s.status}"
        return False
    undone = sorted(n for n, st in s.steps.items() if st.status in ("compensated", "compensation_failed"))
    if undone:
        t.why = f"redrive refused: steps {undone} were compensated, so the run cannot continue"
        return False
    t.emit("run.redrive_requested", data={"previous_error": s.error, **({"by": by} if by else {})})
    s.status, s.error_type, s.error = "running", None, None
    for name in sorted(s.steps):
        if s.steps[name].status in ("failed", "cancelled"):
            st = t.mut(name)
            st.retry_base = st.attempt
            t.wf.step(name).issue(t, name)
    return True


def migrate(t: Transitions, m: MigrateRequested) -> bool:
    """Pin the run to another definition (``t.wf`` is that one; ``calmrun deploy check`` vouched for it)."""
    s = t.s
    if s.status != "running":
        t.why = f"migrate needs a running run; this one is {s.status}"
        return False
    if m.checked_seq is not None and s.seq != m.checked_seq:
        t.why = f"the run moved on since it was checked (seq {s.seq}, checked at {m.checked_seq})"
        return False
    if (s.version, s.digest) == (m.version, m.digest):
        t.why = f"the run is on version {m.version} ({m.digest}) already"
        return False
    missing = sorted(n for n in s.steps if n not in t.wf.steps_by_name)
    if missing:
        t.why = f"migrate refused: version {m.version} has no steps {missing}, which this run has"
        return False
    before = {"version": s.version, "digest": s.digest}
    s.version, s.digest = m.version, m.digest
    to = {"version": m.version, "digest": m.digest}
    data: dict[str, Any] = {"from": before, "to": to, "checked_seq": m.checked_seq}
    t.emit("run.migrated", data={**data, **({"by": m.by} if m.by else {})})
    return True


def cancel(t: Transitions, c: CancelRequested) -> bool:
    s = t.s
    was = s.status
    if was not in CANCELLABLE:
        t.why = f"cancel needs a running or quarantined run; this one is {was}"
        return False
    t.emit("run.cancel_requested", data={"reason": c.reason, "by": c.by, "status": was})
    why = f"cancelled{f' by {c.by}' if c.by else ''}: {c.reason or 'no reason given'}"
    if was != "running":  # its saga ran (or runs) at the quarantine: the run is closed for good
        why += f" (it was {was}: {s.error_type}: {s.error})"
    s.status, s.error_type, s.error = "cancelled", None, why
    if was == "running":
        t.cancel_active("run cancelled")
        t.saga()  # emits run.cancelled when the last compensation is done (or at once: none)
    elif not s.compensations:
        t.next_compensation(done=None)  # nothing left to undo: run.cancelled now
    return True


def held(state: RunState, event: HeldInput) -> Decision:
    """Keep a command in the run's state, or take the oldest out; logged as a note (seq -1), not applied.

    The note carries the command and ``after_seq`` (the run's seq then), so that a recorded replay puts
    it back between the same decisions and rebuilds ``RunState.held`` exactly.
    """
    if isinstance(event, CommandHeld):
        entry = json.dumps({"at_ms": event.at_ms, "command": event.command}, sort_keys=True)
        new = state.model_copy(update={"held": [*state.held, entry]})
        data: dict[str, Any] = {
            "reason": event.reason,
            "command": event.command.get("command"),
            "held": len(new.held),
            "entry": entry,
        }
        type_: Any = "input.held"
    else:
        if not state.held:
            return Decision(state=state, ignored="no command is held for this run")
        first: dict[str, Any] = json.loads(state.held[0])
        new = state.model_copy(update={"held": state.held[1:]})
        data = {"command": (first.get("command") or {}).get("command"), "held": len(new.held)}
        type_ = "input.released"
    note = RunEvent(
        run_id=state.run_id,
        seq=-1,  # logged, not applied: a held command is decided when it is released
        type=type_,
        at_ms=event.at_ms,
        workflow=state.workflow,
        version=state.version,
        tenant=state.tenant,
        data={**data, "after_seq": state.seq},
    )
    return Decision(state=new, events=(note,))

"""The page's actions on one run: which command each is, and when it is refused (pure: no Kafka).

Each action is the command ``calmrun approve``, ``reject``, ``signal`` or ``cancel`` sends, checked the
same way against the run's state in the page's index (a step not waiting, a finished run: refused here
rather than ignored by the worker later), with the user's name as ``by``. An approval is answered in the
user's own name, which the step's ``approvers`` must list (when it lists any); the other commands carry
``ui:<name>``, as a redrive from the page does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from calmrun.workflow.events import RunCommand
from calmrun.workflow.state import RunState

ACTIONS = ("approve", "reject", "signal", "cancel")
CANCELLABLE = ("running", "quarantined", "over_budget")


class Refused(Exception):
    """An action the page will not send.

    Attributes:
        status: the HTTP status to answer (400 malformed, 403 not this user's, 409 not now).
        message: why, for the person.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def command_for(
    kind: str, body: Mapping[str, Any], state: RunState, user: str, waiting: Sequence[Mapping[str, Any]]
) -> RunCommand:
    """The command for action ``kind`` on the run in ``state``, by ``user``.

    Args:
        body: the request: ``step`` and ``comment`` (approve, reject: a comment is required to reject),
            ``name`` and ``data`` (signal: a JSON object), ``reason`` (cancel).
        waiting: the Inbox rows of this run (``RunIndex.waiting``): who may answer which step.

    Raises:
        Refused: the action does not fit the run now, the user may not answer, or the body is malformed.
    """
    run_id, wf = state.run_id, state.workflow
    try:
        if kind in ("approve", "reject"):
            step = _text(body, "step")
            comment = str(body.get("comment") or "").strip() or None
            if kind == "reject" and comment is None:
                raise Refused(400, "a rejection needs a comment (it is recorded with the answer)")
            st = state.steps.get(step)
            if st is None or st.status != "waiting":
                where = st.status if st else "not started"
                raise Refused(
                    409, f"step {step!r} of run {run_id} is not waiting for an answer (it is {where})"
                )
            row = next((w for w in waiting if w["step"] == step), None)
            approvers = list(row["approvers"]) if row else []
            if row is not None and row["kind"] != "approval":
                raise Refused(409, f"step {step!r} waits for the signal {row['signal']!r}, not an approval")
            if approvers and user not in approvers:
                raise Refused(
                    403, f"{user} may not answer {step!r}: its approvers are {', '.join(approvers)}"
                )
            return RunCommand(command=kind, run_id=run_id, workflow=wf, step=step, by=user, comment=comment)
        if kind == "signal":
            name = _text(body, "name")
            data = body.get("data", {})
            if not isinstance(data, dict):
                raise Refused(400, f"a signal's payload must be a JSON object, not {type(data).__name__}")
            if state.status != "running":
                raise Refused(409, f"run {run_id} is {state.status}: no step can take a signal")
            return RunCommand(
                command="signal", run_id=run_id, workflow=wf, name=name, data=data, by=f"ui:{user}"
            )
        if kind == "cancel":
            reason = _text(body, "reason")
            if state.status not in CANCELLABLE:
                raise Refused(409, f"run {run_id} is {state.status}: nothing to cancel")
            return RunCommand(command="cancel", run_id=run_id, workflow=wf, reason=reason, by=f"ui:{user}")
    except ValidationError as exc:
        raise Refused(400, f"not a valid {kind}: {exc.errors(include_url=False)[0]['msg']}") from None
    raise Refused(400, f"unknown action {kind!r}: one of {', '.join(ACTIONS)} (or a redrive)")


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Refused(400, f"{key} is required")
    return value.strip()

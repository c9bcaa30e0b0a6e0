"""A request that cannot start a run, recorded under the run ID it names: the ``run.rejected`` history.

A run request can be refused before any definition applies: its workflow is unknown, a field is extra,
its key and ``run_id`` differ, its bytes are not a request, it is over the size limit. When the run ID can
still be read, the worker records the refusal under it, so whoever waits for that run (``calmrun submit
--wait``, the operator page, any Kafka client) sees why instead of waiting forever:

- a new run ID gets a history of one event, ``run.rejected`` at seq 1 (``data``: ``error_type`` and
  ``error``), and a state with status ``rejected``: terminal, like ``run.completed``. The run ID is taken
  from then on, as any run's is: a corrected request needs a new ID (a second request under it is a
  duplicate, logged as ``input.ignored``).
- a run ID that already exists is never changed by a request: valid or not, a duplicate is logged as
  ``input.ignored`` (seq -1) with the cause, and the run goes on as it was.

Pure, like the decider: no Kafka, no clock; the time arrives as ``at_ms``. The worker writes what these
functions return in the same transaction as the request's dead letter (``streams.intake``).
"""

from __future__ import annotations

from typing import Any

from calmrun.workflow.events import RunEvent
from calmrun.workflow.state import RunState

REJECTED = "run.rejected"


def rejected(
    run_id: str, *, workflow: str, tenant: str, at_ms: int, error_type: str, error: str
) -> tuple[RunState, RunEvent]:
    """The state and the one event of a run whose request was refused (the run ID is new)."""
    state = RunState(
        run_id=run_id,
        workflow=workflow,
        version="",
        tenant=tenant,
        status="rejected",
        seq=1,
        created_ms=at_ms,
        clock_ms=at_ms,
        error_type=error_type,
        error=error,
    )
    event = RunEvent(
        run_id=run_id,
        seq=1,
        type=REJECTED,
        at_ms=at_ms,
        workflow=workflow,
        tenant=tenant,
        data={"error_type": error_type, "error": error},
    )
    return state, event


def ignored(state: RunState, *, at_ms: int, reason: str, **data: Any) -> RunEvent:
    """The log line (seq -1, never applied) of an input that does not change ``state``'s run."""
    return RunEvent(
        run_id=state.run_id,
        seq=-1,
        type="input.ignored",
        at_ms=at_ms,
        workflow=state.workflow,
        version=state.version,
        tenant=state.tenant,
        data={"reason": reason, **data},
    )


def is_rejection(events: list[RunEvent], state: RunState | None) -> bool:
    """Is this history (seq >= 1, in order) a rejected request's, and ``state`` its state?"""
    return (
        len(events) == 1
        and events[0].type == REJECTED
        and events[0].seq == 1
        and state is not None
        and state.status == "rejected"
        and state.seq == 1
    )

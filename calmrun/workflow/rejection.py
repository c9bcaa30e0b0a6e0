"""A request that cannot start a run, recorded under the run ID it names: ``run.rejected``.

A run request can be refused before any definition applies: its workflow is unknown, a field is extra,
its key and ``run_id`` differ, its bytes are not a request, it is over the size limit. When the run ID can
still be read, the worker records the refusal under it, so whoever waits for that run (``calmrun submit
--wait``, the operator page, any Kafka client) sees why instead of waiting forever:

- a run ID without a run gets the event ``run.rejected`` (``data``: ``error_type`` and ``error``) and a
  state with status ``rejected``: terminal, but with no history (``seq`` 0; the event is logged with
  ``seq`` -1, as a note that applies nothing). A rejection takes no run ID: the next request under it is
  decided as if there were no run (a corrected request, or the same one re-injected by ``calmrun dlq
  redrive`` once its workflow is deployed), and its run, or its own rejection, replaces this one.
- a run ID that has a run is never changed by a request: valid or not, a duplicate is logged as
  ``input.ignored`` (seq -1) with the cause, and the run goes on as it was.

Pure, like the decider: no Kafka, no clock; the time arrives as ``at_ms``. The worker writes what these
functions return in the same transaction as the request's dead letter (``streams.refusals``).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from calmrun.workflow.events import RunEvent
from calmrun.workflow.state import RunState

REJECTED = "run.rejected"


def rejected(
    run_id: str, *, workflow: str, tenant: str, at_ms: int, error_type: str, error: str
) -> tuple[RunState, RunEvent]:
    """The state and the event of a refused request under a run ID that has no run."""
    state = RunState(
        run_id=run_id,
        workflow=workflow,
        version="",
        tenant=tenant,
        status="rejected",
        seq=0,  # no history: the event below applies nothing
        created_ms=at_ms,
        clock_ms=at_ms,
        error_type=error_type,
        error=error,
    )
    event = RunEvent(
        run_id=run_id,
        seq=-1,
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


def is_rejected(state: RunState | None) -> TypeGuard[RunState]:
    """Is ``state`` a rejected request's (no run: the next request under its ID is decided anew)?"""
    return state is not None and state.status == "rejected"

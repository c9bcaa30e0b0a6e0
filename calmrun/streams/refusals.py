"""Bad input that names its run: answered under that run, in the transaction of its dead letter.

A client that sent a bad record should not wait for nothing (see ``docs/step-contract.md`` and
``docs/plain-clients.md``):

- a refused run request whose run ID can be read (``streams.requests.named``) records ``run.rejected``
  under it (``workflow.rejection``), with a terminal state that ``calmrun submit --wait``, the operator
  page and any Kafka client see; a run that exists already gets an ``input.ignored`` note and stays as
  it was;
- a malformed step result that names its run (``streams.results.named_attempt``) fails the attempt it
  answers at once with ``InvalidOutputError`` and the cause, as an output over the limits does, instead
  of leaving the run to wait out the attempt's deadline;
- a result for a run this worker does not know is logged and parked, never dropped.

Each record is parked too (its dead letter names the run, and the step and attempt when known). A record
that names no run is only parked, as before (``Intake.park``).
"""

from __future__ import annotations

import logging
from typing import Protocol, TypeAlias

from aiokafka import ConsumerRecord

from calmrun.errors import CalmrunError, DecodeError, ErrorKind, InvalidOutputError, UnknownRunError
from calmrun.kafka.topics import INVALID, partition_for
from calmrun.streams.checkpoint import Pending
from calmrun.streams.deciding import Deciding
from calmrun.streams.ports import Parking
from calmrun.streams.records import StateOut
from calmrun.streams.requests import Named
from calmrun.streams.results import NamedAttempt
from calmrun.streams.shared import Shared
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.events import StepResult, StepResultRecord
from calmrun.workflow.rejection import ignored, is_rejected, rejected
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")
IN_FLIGHT = frozenset({"scheduled", "compensating"})  # a step status with an attempt's task out

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class Counts(Protocol):
    """The counters kept here (the intake's)."""

    poison: int
    rejected: int
    results_malformed: int
    results_unknown_run: int


class Doors(Parking, Protocol):
    """Where a refused record goes: parked, or moved to the partition of the run it names (the intake)."""

    def move(self, rec: Record, p: int, run_id: str, pending: Pending) -> None: ...


class Serves(Protocol):
    """Is this run's version served here (``streams.versions.Pinning``)?"""

    def serves(self, state: RunState) -> bool: ...


class Refusals:
    """Answers bad input under the run it names; see the module docstring.

    Args:
        counts: the intake's counters (``IntakeCounts``: ``poison``, ``rejected``, ``results_malformed``,
            ``results_unknown_run``).
        doors: parks a record that names no run, moves one to the partition of the run it names (the
            intake).
        pins: is this run's version served here (``streams.versions``)?
    """

    def __init__(
        self, shared: Shared, decisions: Deciding, counts: Counts, doors: Doors, pins: Serves
    ) -> None:
        s = shared
        self.topics, self.workflows, self._own = s.topics, s.workflows, s.ownership
        self._decisions, self.counts, self._doors, self._pins = decisions, counts, doors, pins
        self._clock, self._redact, self._n = s.clock, s.redactor.text, s.n

    def request(self, rec: Record, exc: Exception, who: Named | None, pending: Pending) -> None:
        """Refuse a run request: park it and, when it names a run ID, say why under that ID.

        In the transaction of the dead letter: a run ID without a run gets ``run.rejected`` and a rejected
        state (replacing an earlier rejection), a run an ``input.ignored`` note and nothing else
        (``workflow.rejection``).
        """
        if who is None:
            self._doors.park(rec, exc, None, pending)
            return
        p = partition_for(who.run_id, self._n)
        if p != rec.partition:
            self._doors.move(rec, p, who.run_id, pending)
            return
        self.counts.poison += 1
        error = self._redact(str(exc))
        log.warning("run request %s[%d]@%d rejected: %s", rec.topic, p, rec.offset, error)
        stable = type(exc).kind if isinstance(exc, CalmrunError) else None
        kind = str(stable or type(exc).__name__)
        dlq = DlqRecord.poison(rec, exc, None, self._clock()).model_copy(update={"run_id": who.run_id})
        letter = self._decisions.dlq_out(self.topics.dlq(INVALID), p, rec.key, dlq)
        state = self._own.state(p, who.run_id)
        if state is not None and not is_rejected(state):  # a duplicate run ID: the run stays as it was
            note = ignored(
                state,
                at_ms=rec.timestamp,
                reason=f"a rejected request for a run that exists: {error}",
                input="RunRequest",
                error_type=kind,
                error=error,
            )
            self._decisions.submit(p, [letter, self._decisions.event_out(p, note)], (pending,), (note,))
            return
        self.counts.rejected += 1
        new, event = rejected(
            who.run_id,
            workflow=who.workflow,
            tenant=who.tenant,
            at_ms=rec.timestamp,
            error_type=kind,
            error=error,
        )
        encoded = self._own.runs[p].put(who.run_id, new)
        assert encoded is not None  # a rejected run is finished, so kept encoded
        state_out = StateOut(self.topics.state, p, who.run_id.encode(), lambda: encoded)
        outputs = [letter, self._decisions.event_out(p, event)]
        self._decisions.submit(p, outputs, (pending,), (event,), state_out)

    def agent_of(self, result: StepResultRecord) -> str | None:
        """The agent of the step a result answers, from its run's definition (for an error's message)."""
        state = self._own.state(partition_for(result.run_id, self._n), result.run_id)
        wf = self.workflows.pinned(state.workflow, state.version, state.digest) if state else None
        step = next((s for s in wf.steps if s.name == result.step), None) if wf else None
        if step is None:
            return None
        return step.compensation() if result.kind == "compensate" else step.runs_agent()

    def result(self, rec: Record, exc: DecodeError, who: NamedAttempt | None, pending: Pending) -> None:
        """A results record that is not a valid result: fail the attempt it answers at once, if it is told.

        The attempt is the one the record names; a record without ``step`` or ``attempt`` answers the
        run's only attempt in flight, if it has exactly one (else only the dead letter is written, and the
        attempt's deadline re-issues it). The dead letter names the run, step and attempt it was for.
        """
        if who is None:
            self._doors.park(rec, exc, None, pending)
            return
        p = partition_for(who.run_id, self._n)
        if p != rec.partition:
            self._doors.move(rec, p, who.run_id, pending)
            return
        state = self._own.state(p, who.run_id)
        if state is None or is_rejected(state):
            self.unknown_run(rec, who.run_id, state, pending, exc)
            return
        wf = self.workflows.pinned(state.workflow, state.version, state.digest)
        step, attempt, kind = who.step, who.attempt, who.kind
        if step is None or attempt is None:  # the run's one attempt in flight, if it has exactly one
            flying = [
                (name, st)
                for name, st in state.steps.items()
                if st.status in IN_FLIGHT and (step is None or name == step)
            ]
            if len(flying) == 1:
                step, st = flying[0]
                attempt = attempt or st.attempt
                kind = "compensate" if st.status == "compensating" else "run"
        dlq = DlqRecord.poison(rec, exc, state.workflow, self._clock()).model_copy(
            update={"run_id": who.run_id, "step": step, "attempt": attempt}
        )
        letter = self._decisions.dlq_out(self.topics.dlq(state.workflow), p, rec.key, dlq)
        self.counts.poison += 1
        log.warning(
            "malformed result %s[%d]@%d for run %s step %s attempt %s: %s",
            rec.topic,
            rec.partition,
            rec.offset,
            who.run_id,
            step,
            attempt,
            self._redact(str(exc)),
        )
        if wf is None or step is None or attempt is None or not self._pins.serves(state):
            self._decisions.submit(p, [letter], (pending,), ())  # the attempt's deadline re-issues it
            return
        self.counts.results_malformed += 1
        self._decisions.submit(p, [letter], (), ())
        spec = next((s for s in wf.steps if s.name == step), None)
        agent = (spec.compensation() if kind == "compensate" else spec.runs_agent()) if spec else None
        failed = InvalidOutputError(agent or "?", f"malformed result record: {exc}")
        inp = StepResult(
            run_id=who.run_id,
            step=step,
            attempt=attempt,
            at_ms=rec.timestamp,
            kind=kind,
            error_type=ErrorKind.INVALID_OUTPUT.value,
            error=self._redact(str(failed)),
            retriable=True,
        )
        self._decisions.decide(p, wf, state, inp, rec, (pending,))

    def unknown_run(
        self,
        rec: Record,
        run_id: str,
        state: RunState | None,
        pending: Pending,
        cause: Exception | None = None,
    ) -> None:
        """Park a result for a run not known here (or one rejected: it ran nothing), with the cause."""
        self.counts.results_unknown_run += 1
        why = "its request was rejected, so it ran no step" if state is not None else ""
        exc = UnknownRunError(run_id, "; ".join(s for s in (why, str(cause or "")) if s))
        dlq = DlqRecord.poison(rec, exc, None, self._clock()).model_copy(update={"run_id": run_id})
        self.counts.poison += 1
        log.warning(
            "result for unknown run %s parked (%s[%d]@%d)", run_id, rec.topic, rec.partition, rec.offset
        )
        out = self._decisions.dlq_out(self.topics.dlq(INVALID), rec.partition, rec.key, dlq)
        self._decisions.submit(rec.partition, [out], (pending,), ())

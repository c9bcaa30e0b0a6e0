"""The intake: fetch records, turn each into a decider input or a task to run, park what cannot be.

A result of a step run here comes in too (``result``, through ``streams.ports.Returns``), and goes on to the
decider as a pool's result read from the results topic does.

Every record is handled in isolation: whatever its handling raises parks that record in a dead-letter
topic with the cause and finishes it, so one record never stops the worker. Only
``limits.max_consecutive_poison`` records in a row failing with an unexpected error (a bug of ours, not
bad input) stop it. Records of a partition not (yet) owned are rewound and read again later.

Bad input that names its run is answered under that run (``streams.refusals``): a refused request ends
as ``run.rejected``, a malformed result fails the attempt it answers, a result for an unknown run is
parked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias

from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from calmrun.errors import (
    CalmrunError,
    DecodeError,
    LimitExceededError,
    PoisonStormError,
    UnknownWorkflowError,
)
from calmrun.kafka.topics import INVALID, partition_for
from calmrun.streams.checkpoint import Checkpoint, Pending
from calmrun.streams.deciding import Deciding
from calmrun.streams.fetch import getmany
from calmrun.streams.gate import Gate
from calmrun.streams.ownership import Stalls
from calmrun.streams.ports import Failures, Returns, Source
from calmrun.streams.records import IDEMPOTENCY_KEY, MOVED_FROM, Out, header
from calmrun.streams.refusals import Refusals
from calmrun.streams.requests import Named, named, parse_request
from calmrun.streams.results import named_attempt, parse_result
from calmrun.streams.shared import Shared
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.versions import Pinning
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.decider import task_ignored
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import (
    DeciderInput,
    MigrateRequested,
    RedriveRequested,
    RunCommand,
    RunRequest,
    RunRequested,
    StepResult,
    StepTask,
    command_input,
)
from calmrun.workflow.rejection import ignored, is_rejected
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class IntakeCounts:
    def __init__(self) -> None:
        self.requests = 0
        self.results = 0
        self.tasks_skipped = 0
        self.poison = 0
        self.tasks_unserved = 0  # tasks of a version not served here: not run (see streams.versions)
        self.rejected = 0  # refused run requests recorded under their run ID (run.rejected)
        self.results_malformed = 0  # malformed results that failed the attempt they name
        self.results_unknown_run = 0  # results for a run not known here: parked


class Stamping(Protocol):
    """The decider's input for a run request, stamped (``streams.stamps``: tenant spend, planner figures)."""

    def request(self, run_id: str, wf: WorkflowDef, body: RunRequest, at_ms: int) -> RunRequested: ...


class Intake:
    """Reads the worker's input topics, and takes the results of the steps run here; see the module
    docstring.

    Args:
        gate: decisions not yet committed: no fetch while too many are.
        stalls: a paused worker proves its partitions are its own before it handles what it fetched.
        returns: the way a result of a step run here comes back; the intake opens it to itself.
        failures: told of a storm of unexpected errors (``PoisonStormError``).
    """

    def __init__(
        self,
        shared: Shared,
        stalls: Stalls,
        checkpoint: Checkpoint,
        gate: Gate,
        tasks: TaskRunner,
        decisions: Deciding,
        pins: Pinning,
        stamps: Stamping,
        returns: Returns,
        failures: Failures,
    ) -> None:
        s = shared
        self.settings, self.topics, self.codec, self.workflows = s.settings, s.topics, s.codec, s.workflows
        self._own, self._stalls, self._checkpoint, self._gate = s.ownership, stalls, checkpoint, gate
        self._tasks, self._decisions, self.pins, self._stamps = tasks, decisions, pins, stamps
        self._failures, self._clock, self._redact, self._n = failures, s.clock, s.redactor.text, s.n
        self._unexpected_in_row = 0
        self.counts = IntakeCounts()
        self.refusals = Refusals(shared, decisions, self.counts, self, pins)
        returns.open(self)

    async def run(self) -> None:
        """Fetch and handle records until cancelled."""
        consumer = self._own.consumer
        assert consumer is not None
        limit = self.settings.worker.max_in_flight
        while True:
            await self._tasks.room()
            await self._gate.room()  # decisions outrun the commits when agents return at once: fetch no more
            fetched = await getmany(
                consumer,
                timeout_ms=200,
                max_records=max(limit, 500),
                consumed_to=self._checkpoint.consumed_to,
            )
            await self._stalls.revalidate_if_stalled()  # before a paused worker starts any task it read
            for tp, records in fetched.records.items():
                if tp.partition not in self._own.owned:
                    # fetched before this partition was taken over here: read it again later
                    consumer.seek(tp, records[0].offset)
                    continue
                for rec in records:
                    if tp.partition not in self._own.owned:  # lost to a fence meanwhile
                        break
                    pending = self._checkpoint.consumed(tp, rec.offset)
                    self.isolated(self._handler(rec.topic), rec, pending)
            for tp, offset, exc in fetched.unreadable:
                self._unparsable(tp, offset, exc)

    def _handler(self, topic: str) -> Callable[[Record, Pending], None]:
        if topic == self.topics.requests:
            return self._request
        return self._result if topic == self.topics.results else self._task

    def isolated(self, handle: Callable[[Record, Pending], None], rec: Record, pending: Pending) -> None:
        """Handle one record; whatever it raises parks that record as poison and finishes it."""
        try:
            handle(rec, pending)
        # Broad on purpose: the record is parked with the cause and its offset committed past it.
        except Exception as exc:
            if not isinstance(exc, CalmrunError):
                self._unexpected_in_row += 1
            self.park(rec, exc, None, pending)
            if self._unexpected_in_row >= self.settings.limits.max_consecutive_poison:
                self._failures.fail(PoisonStormError(self._unexpected_in_row, type(exc).__name__))
        else:
            self._unexpected_in_row = 0

    def _request(self, rec: Record, pending: Pending) -> None:
        self.counts.requests += 1
        fallback = f"{rec.topic}-{rec.partition}-{rec.offset}"
        limits = self.settings.limits
        try:
            run_id, body = parse_request(
                rec.key, rec.value, self.codec, fallback_id=fallback, limits=limits, headers=rec.headers
            )
        except DecodeError as exc:
            self.refusals.request(rec, exc, named(rec.key, rec.value, limits), pending)
            return
        p = partition_for(run_id, self._n)
        if p != rec.partition:
            # produced by a client with another partitioner (kcat's default, or no key): move it to the
            # partition that owns this run, keyed by the run ID
            self.move(rec, p, run_id, pending)
            return
        state = self._own.runs[p].get(run_id)
        if is_rejected(state) and isinstance(body, RunRequest):
            state = None  # a rejection takes no run ID: this request is decided anew (workflow.rejection)
        if isinstance(body, RunCommand):
            self.command(p, run_id, body, state, rec.timestamp, rec, pending)
            return
        # a new run takes the newest version served here, or the one it names (streams.versions)
        pinned = body.version is not None
        wf = (
            self.workflows.version(body.workflow, body.version or "")
            if pinned
            else self.workflows.newest(body.workflow)
        )
        if wf is None:
            unknown = f"{body.workflow} v{body.version}" if pinned else body.workflow
            why = UnknownWorkflowError(unknown, [str(p) for p in self.workflows.pins()])
            self.refusals.request(rec, why, Named(run_id, body.workflow, body.tenant), pending)
            return
        inp = self._stamps.request(run_id, wf, body, rec.timestamp)
        # lazy: re-read once this is committed, the request finds its run and is ignored as a duplicate
        self._decisions.decide(p, wf, state, inp, rec, (pending,), redelivered=True, lazy=True)

    def command(
        self,
        p: int,
        run_id: str,
        body: RunCommand,
        state: RunState | None,
        at_ms: int,
        rec: Record | None = None,
        pending: Pending | None = None,
    ) -> None:
        """Decide an operator's command; one for a run pinned to a version not served here is held."""
        rec = rec or self._synthetic(p, run_id, body, at_ms)  # a held command, released (no record)
        done = (pending,) if pending is not None else ()
        limits = self.settings.limits
        if is_rejected(state):  # no run: no definition applies, nothing to decide
            why = f"{body.command} for a run whose request was rejected ({state.error_type})"
            note = ignored(state, at_ms=at_ms, reason=why, input=body.command)
            self._decisions.submit(p, [self._decisions.event_out(p, note)], done, (note,))
            return
        if body.command == "migrate":
            wf = self.workflows.pinned(body.workflow, body.to_version or "", body.to_digest or "")
        elif state is not None:
            wf = self.workflows.pinned(state.workflow, state.version, state.digest)
            if wf is None:
                self.pins.hold(p, state, body, at_ms, pending)
                return
        else:
            wf = self.workflows.newest(body.workflow)  # no such run: the decider says so
        if wf is None:
            target = f" v{body.to_version or '?'} ({body.to_digest or 'any digest'})"
            what = body.workflow + (target if body.command == "migrate" else "")
            self.park(rec, UnknownWorkflowError(what, [str(p) for p in self.workflows.pins()]), None, pending)
            return
        inp: DeciderInput
        if body.command == "migrate":
            inp = MigrateRequested(run_id, at_ms, wf.version, wf.digest, body.by, body.checked_seq)
        elif body.command != "redrive":
            inp = command_input(run_id, body, at_ms)  # approve, reject, signal, cancel
        else:
            attempts = sum(st.attempt for st in state.steps.values()) if state else 0
            if attempts >= limits.max_attempts_per_run:
                over = LimitExceededError(  # the next attempt would be one too many
                    "max_attempts_per_run",
                    actual=attempts + 1,
                    maximum=limits.max_attempts_per_run,
                    what="redrive",
                )
                self.park(rec, over, wf.name, pending)
                return
            inp = RedriveRequested(run_id, at_ms, body.by)
        self._decisions.decide(p, wf, state, inp, rec, done, redelivered=pending is not None)

    def _synthetic(self, p: int, run_id: str, body: RunCommand, at_ms: int) -> Record:
        value = body.model_dump_json().encode()
        key = run_id.encode()
        return ConsumerRecord(
            self.topics.requests, p, -1, at_ms, 0, key, value, None, len(key), len(value), ()
        )

    def _result(self, rec: Record, pending: Pending) -> None:
        """A pool executor's answer (``streams.results``): decided as a local agent's result would be."""
        self.counts.results += 1
        try:
            result = parse_result(
                rec.key,
                rec.value,
                self.codec,
                limits=self.settings.limits,
                headers=rec.headers,
                agent_of=self.refusals.agent_of,
            )
        except DecodeError as exc:
            who = named_attempt(rec.key, rec.value, self.settings.limits)
            self.refusals.result(rec, exc, who, pending)
            return
        p = partition_for(result.run_id, self._n)
        if p != rec.partition:  # another client's partitioner: move it to the run's partition
            self.move(rec, p, result.run_id, pending)
            return
        state = self._own.state(p, result.run_id)
        if state is None or is_rejected(state):
            self.refusals.unknown_run(rec, result.run_id, state, pending)
            return
        if not self.pins.serves(state):
            # pinned to a version not served here: as for its task, the attempt's deadline re-issues it
            self.counts.tasks_unserved += 1
            self._decisions.submit(p, [], (pending,), (), lazy=True)  # nothing written: nothing to repeat
            return
        wf = self.workflows.pinned(state.workflow, state.version, state.digest)
        if wf is None:
            known = [str(pin) for pin in self.workflows.pins()]
            self.park(rec, UnknownWorkflowError(result.workflow, known), None, pending)
            return
        inp = result.to_input(rec.timestamp)
        # lazy: re-read once this is committed, the result finds its attempt decided and is ignored
        self._decisions.decide(p, wf, state, inp, rec, (pending,), redelivered=True, lazy=True)

    def result(
        self, p: int, task: StepTask, result: StepResult, source: Source, pending: Sequence[Pending]
    ) -> None:
        """A step run here has its result (the task runner's ``ResultSink``, through ``Returns``): decided
        as a pool's result read from the results topic is, unless its run was dropped meanwhile."""
        state = self._own.state(p, task.run_id)
        wf = self.workflows.pinned(state.workflow, state.version, state.digest) if state else None
        if wf is None:  # only tasks of runs served here are started: the run was dropped meanwhile
            return
        # lazy: a task record re-read once this is committed finds its attempt decided (``task_ignored``)
        self._decisions.decide(p, wf, state, result, source, pending, lazy=True)

    def move(self, rec: Record, p: int, run_id: str, pending: Pending) -> None:
        """Move a record to the partition of the run it names, keyed by the run ID (its own is finished)."""
        moved = (*rec.headers, (MOVED_FROM, f"{rec.partition}:{rec.offset}".encode()))
        out = Out(rec.topic, p, run_id.encode(), rec.value, moved)
        self._decisions.submit(rec.partition, [out], (pending,), ())

    def _task(self, rec: Record, pending: Pending) -> None:
        idem_bytes = header(rec.headers, IDEMPOTENCY_KEY)
        idem = idem_bytes.decode(errors="replace") if idem_bytes is not None else None
        if idem is not None and self._tasks.echo(idem, rec.partition, pending):
            return
        try:
            task = self.codec.decode_as(rec.value or b"", StepTask)
        except DecodeError as exc:
            self.park(rec, exc, None, pending)
            return
        if task.idempotency_key != idem and self._tasks.echo(task.idempotency_key, rec.partition, pending):
            return
        p = rec.partition
        state = self._own.state(p, task.run_id)
        if state is not None and not self.pins.serves(state):
            # pinned to a version not served here: not run; its deadline re-issues it (streams.versions)
            self.counts.tasks_unserved += 1
            self._decisions.submit(p, [], (pending,), (), lazy=True)
            return
        ignored = task_ignored(state, task, self._clock())
        if ignored is not None:  # lazy: re-read, it is as stale as now
            self.counts.tasks_skipped += 1
            note = [self._decisions.event_out(p, ignored)]
            self._decisions.submit(p, note, (pending,), (ignored,), lazy=True)
            return
        self._tasks.start(p, task, rec, eager=False, pending=[pending])

    def park(self, rec: Record, exc: Exception, workflow: str | None, pending: Pending | None) -> None:
        """Park a record that cannot be processed at all; the worker goes on with the next one."""
        self.counts.poison += 1
        log.warning(
            "poison record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, self._redact(str(exc))
        )
        dlq = DlqRecord.poison(rec, exc, workflow, self._clock())
        out = self._decisions.dlq_out(self.topics.dlq(workflow or INVALID), rec.partition, rec.key, dlq)
        self._decisions.submit(rec.partition, [out], (pending,) if pending is not None else (), ())

    def _unparsable(self, tp: TopicPartition, offset: int, exc: Exception) -> None:
        """Park a record the Kafka client could not even parse (see ``streams.fetch``): no bytes to keep."""
        if tp.partition not in self._own.owned:
            assert self._own.consumer is not None
            self._own.consumer.seek(tp, offset)  # as for a record fetched before its partition was ours
            return
        rec: Record = ConsumerRecord(tp.topic, tp.partition, offset, -1, 0, None, None, None, -1, -1, ())
        pending = self._checkpoint.consumed(tp, offset)
        why = DecodeError(f"the Kafka client cannot parse this record (a header name not UTF-8?): {exc!r}")
        self.park(rec, why, None, pending)

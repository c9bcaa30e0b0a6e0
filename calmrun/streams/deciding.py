"""From an input to the records of its decision: decide, hold the new state, queue the transaction.

The decider is pure; this is where its decision meets Kafka. The events (redacted per ``settings.redact``),
the tasks, a quarantine's dead letter and the run's state go to the run's partition's next transaction
with the inputs the decision finishes; once it commits, the events are counted and observed by the metrics
and the tasks start here (eager execution).

A task is started before its decision commits (``worker.early``) when that decision can only ever be made
again the same way: its input is a committed record (a request, a command, a pool's result) that a crash
re-delivers, and the run has no other decision waiting for a commit (whose input might come back in another
order, or never: a local agent's result). A crash then re-decides the same input on the same state, to the
same attempt and idempotency key, so an agent is started again only under the key it had. The partition's
next transaction waits a little for such tasks (``worker.inline_wait_ms``): a fast step's result then commits
with the decision that scheduled it, one commit cycle fewer on the run's path. A task decided from a local
result still starts only once that decision is committed (a re-run could return another result).

With ``worker.task_records`` off, the tasks of the steps this worker runs itself are not written to their
step topic: the transaction holds the events and the state, and the state says which attempts the
run awaits. A crash after the commit loses nothing: the new owner restores the state and starts those
attempts again (``awaited_tasks``, ``streams.local.Resumption``) under the same attempt and idempotency
key. A pool's tasks are always written: its executors read them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from calmrun.errors import CalmrunError
from calmrun.kafka.topics import partition_for
from calmrun.streams.checkpoint import Pending
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.ports import Source, Starts, Unrecorded
from calmrun.streams.records import Out, StateOut, dlq_out, event_out, task_out
from calmrun.streams.shared import Shared
from calmrun.streams.timers import Timers
from calmrun.tracing import NO_TRACING, Tracing
from calmrun.wire.dlq import MAX_KEY_BYTES, DlqRecord
from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import DeciderInput, RunCommand, RunEvent, RunRequest, StepResult, StepTask
from calmrun.workflow.state import RunState


@dataclass
class DecisionCounts:
    decisions: int = 0
    ignored: int = 0
    quarantined: int = 0
    completed: int = 0
    early: int = 0  # decisions whose tasks started before they committed (worker.early)


class Deciding:
    """Decides inputs and queues their records; see the module docstring.

    Args:
        starts: starts the tasks of a decision here (``streams.local.EagerStarts``), unless run already.
        tracing: told of each decision, which it traces once committed (``calmrun.tracing``).
        recording: which step topics' tasks are not written now: this worker starts them itself (eagerly),
            and a new owner from the restored state (``worker.task_records``, ``streams.local.Recording``).
    """

    def __init__(
        self,
        shared: Shared,
        timers: Timers,
        metrics: WorkerMetrics | None,
        starts: Starts,
        recording: Unrecorded,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings, self.topics, self.codec = shared.settings, shared.topics, shared.codec
        self._recording = recording
        self._own, self._timers, self._redactor = shared.ownership, timers, shared.redactor
        self._clock, self._metrics, self._starts = shared.clock, metrics, starts
        self.counts = DecisionCounts()
        self.tracing = tracing

    def decide(
        self,
        p: int,
        wf: WorkflowDef,
        state: RunState | None,
        inp: DeciderInput,
        source: Source | ConsumerRecord[bytes, bytes] | None,
        pending: Sequence[Pending],
        *,
        redelivered: bool = False,
        lazy: bool = False,
    ) -> Decision:
        """Decide ``inp`` for a run of partition ``p`` and add its records to ``p``'s next transaction.

        ``redelivered``: ``inp`` comes from a record that a crash before this commit re-delivers (its offset
        is in ``pending``), so the decision's tasks may start before the commit (see the module docstring).
        ``lazy``: ``pending`` re-read after this decision is committed would be recognised and ignored, so
        their offsets may commit later (``TxnWriter.add``).
        """
        early = redelivered and self.settings.worker.early and self._own.writer_of(p).quiet(inp.run_id)
        d = decide(wf, state, inp)
        traced = self.tracing.decision(wf, state, inp, d, source.headers if source is not None else ())
        self.counts.decisions += 1
        run_id = inp.run_id
        key = run_id.encode()
        outputs = [self.event_out(p, ev) for ev in d.events]
        if d.ignored:
            self.counts.ignored += 1
            self.submit(p, outputs, pending, d.events, traced=traced, lazy=lazy)
            return d
        assert d.state is not None
        encoded = self._own.runs[p].put(run_id, d.state)  # a finished run is encoded now, and kept so
        unsent = self._recording.unrecorded
        tasks = [
            (task_out(self.topics, self.codec, p, t, self.tracing.task_headers(t), unsent=unsent), t)
            for t in d.tasks
        ]
        outputs += [out for out, _ in tasks if out.value is not None]  # see the module docstring
        outputs += [self.request_out(r) for r in d.requests]  # child runs: start, cancel, tell the parent
        if d.quarantine is not None:
            q = d.quarantine
            dlq = DlqRecord(
                reason="quarantined",
                error_type=q.error_type,
                error=q.error,
                traceback=inp.traceback if isinstance(inp, StepResult) else None,
                workflow=wf.name,
                run_id=run_id,
                step=q.step,
                attempt=q.attempt,
                source_topic=source.topic if source else self.topics.state,
                source_partition=source.partition if source else p,
                source_offset=source.offset if source else -1,
                key=source.key if source else key,
                value=source.value if source else None,
                headers=dict(source.headers) if source else {},
                at_ms=self._clock(),
            )
            outputs.append(self.dlq_out(self.topics.dlq(wf.name), p, key, dlq))
        encode = functools.partial(self.codec.encode, d.state) if encoded is None else lambda: encoded
        state_out = StateOut(self.topics.state, p, key, encode)
        eager = tasks if self.settings.worker.eager else []
        self.submit(
            p,
            outputs,
            pending,
            d.events,
            state_out,
            eager,
            quarantined=d.quarantine is not None,
            traced=traced,
            run_id=run_id,
            early=early,
            lazy=lazy,
        )
        due = d.state.next_due_ms()
        if due is not None:
            self._timers.push(due, p, run_id)
        return d

    def request_out(self, record: RunRequest | RunCommand) -> Out:
        """A record for the requests topic, on the partition of the run it names."""
        assert record.run_id is not None
        n = self.settings.kafka.partitions
        key = record.run_id.encode()
        return Out(self.topics.requests, partition_for(record.run_id, n), key, self.codec.encode(record))

    def submit(
        self,
        p: int,
        outputs: list[Out],
        pending: Sequence[Pending],
        events: Sequence[RunEvent],
        state: StateOut | None = None,
        eager: list[tuple[Out, StepTask]] | None = None,
        *,
        quarantined: bool = False,
        traced: Callable[[], None] | None = None,
        run_id: str | None = None,
        early: bool = False,
        lazy: bool = False,
    ) -> None:
        """Add one decision to partition ``p``'s next transaction with the inputs it answers (``pending``:
        the checkpoint finishes them as that transaction takes them, ``streams.checkpoint``).

        ``eager`` tasks start once it commits, or at once if ``early`` (the transaction then waits a little
        for them); ``run_id`` counts against its run until committed (``TxnWriter.quiet``);
        ``traced`` is called once it is committed (the decision's span: ``calmrun.tracing``); ``lazy``:
        ``pending``'s offsets may commit in a later transaction (``TxnWriter.add``).
        """
        writer = self._own.writer_of(p)

        def on_commit() -> None:
            for ev in events:
                if ev.type == "run.completed":
                    self.counts.completed += 1
                if self._metrics is not None:
                    self._metrics.observe(ev)
            self.counts.quarantined += quarantined
            if eager and not early:
                self._starts.start(p, eager, True)
            if traced is not None:
                traced()

        writer.add(p, outputs, state, on_commit, run_id, inputs=pending, lazy=lazy)
        if eager and early:
            self.counts.early += 1
            writer.hold(self._starts.start(p, eager, False))

    def event_out(self, p: int, ev: RunEvent) -> Out:
        ev = self._redactor.event(ev, self._own.state(p, ev.run_id))  # settings.redact (calmrun.redact)
        return event_out(self.topics, self.codec, p, ev)

    def dlq_out(self, topic: str, p: int, key: bytes | None, dlq: DlqRecord) -> Out:
        state = self._own.state(p, dlq.run_id) if dlq.run_id else None
        dlq = self._redactor.dlq(dlq, state, self.codec)  # settings.redact (calmrun.redact)
        # a dead letter always fits its topic, and always encodes (see DlqRecord.fitted)
        dlq = dlq.fitted(self.settings.limits.dlq_max_payload_bytes)
        key = key if key is None or len(key) <= MAX_KEY_BYTES else key[:MAX_KEY_BYTES]
        try:
            return dlq_out(topic, self.codec, p, key, dlq)
        except CalmrunError as exc:
            dlq = dlq.model_copy(update={"key": None, "value": None, "headers": {}, "error": f"{exc}"})
            return dlq_out(topic, self.codec, p, key, dlq.fitted(0))

"""A pool executor: runs the agents of one pool's steps and answers on the results topic.

``calmrun worker --pool NAME`` reads only the step topics of the steps with ``pool: NAME``, in the
consumer group ``<prefix>.pool.NAME``, and runs each task with the same context, timeout, cost capture,
limits and idempotency key as a deciding worker does. Its answer is a ``StepResultRecord`` on
``<prefix>.runs.results``, keyed by run ID and written to the task's partition, where the deciding
worker that owns the run reads it and decides.

Effectively once, as the deciding worker: one transactional producer per owned partition
(``<prefix>.pool.NAME.tx.<p>``) writes the results with the task offsets they finish, so a crash loses
only uncommitted results, whose tasks are read again and run again under the same idempotency key; a
new owner's initialisation fences the old one. A result the decider has already recorded for that
attempt (a re-run, a re-issued copy) is ignored there, so no attempt records two results. An executor
holds no run state: it cannot tell a stale task from a live one, and runs every task it reads. The
limits per model alias and step (``settings.throttle``) apply per executor process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from prometheus_client import CollectorRegistry

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.errors import DecodeError, WorkerError
from calmrun.kafka.topics import INVALID, Topics, ensure_topics
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams import clients
from calmrun.streams.attempts import Attempts
from calmrun.streams.checkpoint import Checkpoint, Pending
from calmrun.streams.fetch import getmany
from calmrun.streams.gate import Gate
from calmrun.streams.membership import Membership
from calmrun.streams.poolmetrics import PoolCounts, PoolMetrics
from calmrun.streams.ports import Source
from calmrun.streams.records import IDEMPOTENCY_KEY, Out, dlq_out, header
from calmrun.streams.runtime import Loop, Runtime, wall_ms
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.throttle import Throttle
from calmrun.streams.txn import TxnWriter, close_writers, kick_every
from calmrun.streams.txnstate import FENCED
from calmrun.tracing import tracing_for
from calmrun.wire.codec import wire_codec
from calmrun.wire.dlq import MAX_KEY_BYTES, DlqRecord
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import StepResult, StepResultRecord, StepTask

log = logging.getLogger("calmrun.pool")

POOL_HEADER = "calmrun-pool"
"""Header of a result record: the pool that executed the attempt."""


class PoolExecutor(Runtime):
    """Executes the steps of ``pool`` for the given workflows; see the module docstring.

    Args:
        settings: Kafka, worker (``max_in_flight``, session), limits and model configuration.
        workflows: the definitions whose steps name ``pool``; only those step topics are read.
        pool: the pool's name (``"default"``: the steps that name none, for groups of ``--pool none``).
    """

    def __init__(
        self,
        settings: Settings,
        workflows: Sequence[WorkflowDef],
        pool: str,
        agents: AgentRegistry,
        models: ModelRegistry,
        *,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        super().__init__("executor", log)
        self.settings, self.pool, self.agents, self.models, self.clock = settings, pool, agents, models, clock
        self.workflows = [check_workflow(wf, settings) for wf in workflows]
        self.topics = Topics(settings.kafka.prefix)
        self.group_id = self.topics.pool_group(pool)
        self.inputs = list(dict.fromkeys(self.topics.step_topics(self.workflows, pool)))  # versions share
        if not self.inputs:
            names = sorted({wf.name for wf in self.workflows})
            raise WorkerError(f"no step of {names} names pool {pool!r}: this executor would read nothing")
        self.codec, self.redactor = wire_codec(settings.wire), Redactor(settings.redact)
        self.members = Membership(settings, self.inputs, group_id=self.group_id)  # the group, as the worker's
        self.owned: set[int] = set()
        self.writers: dict[int, TxnWriter] = {}  # one per partition, each its own transactional id
        self.counts = PoolCounts()
        self._checkpoint = Checkpoint()  # the one owner of "this input is finished"
        self._gate = Gate(settings.worker.max_unacked)
        self._stable = asyncio.Event()
        self.throttle = Throttle(settings.throttle, self.workflows, models.aliases)  # limits, 429 pauses
        self.tracing = tracing_for(settings, pool=pool, role="pool")  # off unless settings.tracing.endpoint
        self.attempts = Attempts(settings, agents, models, self.throttle, clock, self.tracing)
        # the executor is its task runner's ports: executor, admission, results (to the results topic)
        limits = self.throttle, settings.throttle.max_waiting
        self.tasks = TaskRunner(
            settings.worker.max_in_flight, self, self, self, self._checkpoint, self, *limits
        )
        self.metrics = PoolMetrics(CollectorRegistry(), pool, self)

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The pool group's consumer (None before ``start``)."""
        return self.members.consumer

    @property
    def running(self) -> int:
        """Agents running here now."""
        return self.tasks.counts.running

    # -- lifecycle: streams.runtime runs it ---------------------------------------------------------

    async def _open(self) -> list[tuple[str, Loop]]:
        """Create the topics, join the pool's group; the loops that execute."""
        await ensure_topics(self.settings.kafka, self.workflows)
        await self.members.join(self)
        self.metrics.start(self.settings.metrics)
        log.info("executor of pool %r started: %s, group %s", self.pool, self.inputs, self.group_id)
        commits = kick_every(self.settings.worker.commit_interval_s, self.writers.values)
        return [("calmrun-pool-poll", self._poll_loop()), ("calmrun-pool-commit", commits)]

    async def _close(self) -> None:
        """Cancel running agents (their tasks are read again), commit the results, leave."""
        await self.tasks.cancel(set(self.owned) | set(self.writers))
        await close_writers(self.writers.values())
        self.writers.clear()
        await self.attempts.close()
        await self.members.leave()
        self.metrics.stop()
        self.tracing.close()

    # -- ownership ----------------------------------------------------------------------------------

    async def assigned(self, parts: set[int]) -> None:
        """Own ``parts``: starting each one's transactional id fences its previous owner."""
        new = parts - self.owned
        writers = {p: self._writer(p) for p in new}
        await asyncio.gather(*(wr.start() for wr in writers.values()))
        self.writers.update(writers)
        self.owned |= new
        self._stable.set()
        log.info("pool %r: partitions assigned %s", self.pool, sorted(parts))

    async def revoked(self, parts: set[int]) -> None:
        """Give ``parts`` up: cancel their agents (their tasks are read again by the next owner)."""
        self._stable.clear()
        self.owned -= parts
        await self.tasks.cancel(parts)
        await close_writers([self.writers.pop(p) for p in parts if p in self.writers])
        self._checkpoint.forget(parts)

    def _writer(self, p: int) -> TxnWriter:
        producer = clients.transactional_producer(self.settings, p, self.group_id)
        return TxnWriter(
            f"{p}",
            producer,
            self.group_id,
            self._checkpoint,
            self._gate,
            self,
            {p},
            max_request_size=self.settings.kafka.max_request_size,
            spare=clients.spare_producer(self.settings, p, self.group_id),
            ahead_s=self.settings.kafka.txn_ahead_ms / 1000,
        )

    def lost(self, parts: set[int], exc: BaseException) -> None:
        """A transaction of a partition's writer failed (``Losses``): fenced means another executor owns
        it now; anything else stops this one."""
        if not isinstance(exc, FENCED):
            self.fail(exc)
            return
        for p in parts:
            self._lost(p, exc)

    def _lost(self, p: int, exc: BaseException) -> None:
        self.counts.fenced += 1
        log.warning("pool %r: partition %d taken over by another executor (%r)", self.pool, p, exc)
        self.owned.discard(p)
        self.tasks.cancel_now(p)
        self._checkpoint.forget({p})
        writer = self.writers.pop(p, None)
        if writer is not None:
            asyncio.get_running_loop().create_task(writer.close())

    # -- loops --------------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        limit = self.settings.worker.max_in_flight
        while True:
            await self.tasks.room()
            await self._gate.room()
            fetched = await getmany(
                consumer, timeout_ms=200, max_records=limit, consumed_to=self._checkpoint.consumed_to
            )
            for tp, records in fetched.records.items():
                if tp.partition not in self.owned:
                    consumer.seek(tp, records[0].offset)
                    continue
                for rec in records:
                    self._task(rec, self._checkpoint.consumed(tp, rec.offset))
            for tp, offset, exc in fetched.unreadable:
                empty: ConsumerRecord[bytes, bytes] = ConsumerRecord(
                    tp.topic, tp.partition, offset, -1, 0, None, None, None, -1, -1, ()
                )
                self._park(empty, DecodeError(f"the Kafka client cannot parse this record: {exc!r}"))

    def _task(self, rec: ConsumerRecord[bytes, bytes], pending: Pending) -> None:
        self.counts.tasks += 1
        idem = header(rec.headers, IDEMPOTENCY_KEY)
        if idem is not None and self.tasks.echo(idem.decode(errors="replace"), rec.partition, pending):
            return  # a copy of an attempt running here: it finishes with that attempt's result
        try:
            task = self.codec.decode_as(rec.value or b"", StepTask)
        except DecodeError as exc:
            self._park(rec, exc, pending)
            return
        if self.tasks.echo(task.idempotency_key, rec.partition, pending):
            return
        self.tasks.start(rec.partition, task, rec, eager=False, pending=[pending])

    def _park(
        self, rec: ConsumerRecord[bytes, bytes], exc: Exception, pending: Pending | None = None
    ) -> None:
        """A task record that cannot be read: to ``<prefix>.dlq._invalid`` with its cause, finished."""
        self.counts.poison += 1
        log.warning(
            "pool %r: poison task %s[%d]@%d: %s", self.pool, rec.topic, rec.partition, rec.offset, exc
        )
        dlq = DlqRecord.poison(rec, exc, None, self.clock())
        if dlq.key is not None and len(dlq.key) > MAX_KEY_BYTES:
            dlq = dlq.model_copy(update={"key": dlq.key[:MAX_KEY_BYTES]})
        dlq = dlq.fitted(self.settings.limits.dlq_max_payload_bytes)
        out = dlq_out(self.topics.dlq(INVALID), self.codec, rec.partition, dlq.key, dlq)
        self._send(rec.partition, [out], [pending] if pending is not None else [])

    def _send(
        self, p: int, outputs: list[Out], pending: Sequence[Pending], task: StepTask | None = None
    ) -> None:
        writer = self.writers.get(p)
        if writer is None:
            return  # lost meanwhile: the next owner reads these records again
        n = len([o for o in outputs if o.topic == self.topics.results])
        writer.add(p, outputs, None, self._count(n, task), inputs=pending)  # finished as it is committed

    def _count(self, n: int, task: StepTask | None) -> Callable[[], None]:
        def committed() -> None:
            self.counts.results += n
            if task is not None:
                self.tracing.result_committed(task)  # the attempt's span ends with its commit

        return committed

    # -- tasks: the task runner's ports (streams.ports) ----------------------------------------------

    async def execute(self, task: StepTask) -> StepResult:
        """Run one attempt (``Executor``): an executor holds no run state to redact with."""
        return await self.attempts.run(task, functools.partial(self.redactor.text, state=None))

    async def admit(self, p: int, task: StepTask) -> bool:
        """May ``task`` start (``Admission``): its partition is ours (an executor cannot tell stale tasks)."""
        return await self.accept(p)

    async def accept(self, p: int) -> bool:
        """Is ``p`` ours, once a rebalance under way is over (``Admission``)?"""
        if not self._stable.is_set() and not self._stopped.is_set():
            await self._stable.wait()
        return p in self.owned and not self._stopped.is_set()

    def result(
        self, p: int, task: StepTask, result: StepResult, source: Source, pending: Sequence[Pending]
    ) -> None:
        """Write the result to the results topic with the task records it finishes (``ResultSink``)."""
        record = StepResultRecord.of(task, result, self.pool)
        out = Out(
            self.topics.results,
            p,
            task.run_id.encode(),
            self.codec.encode(record, self.topics.results),
            (
                (IDEMPOTENCY_KEY, task.idempotency_key.encode()),
                (POOL_HEADER, self.pool.encode()),
                *self.tracing.result_headers(task),  # traceparent: the attempt's span
            ),
        )
        self._send(p, [out], pending, task)

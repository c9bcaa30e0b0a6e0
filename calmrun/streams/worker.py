"""The worker: composes the rooms of the shell over Kafka, and runs them from start to stop.

All calmrun topics are co-partitioned by run ID and consumed by one group whose assignor keeps them
co-partitioned (``streams.versions``), so partition N of every topic belongs to one worker: it holds the state
of those runs, executes their default-pool step tasks (a pooled step's result comes back on the results topic
from its executors, ``streams.pool``), and is the only writer of their state. Rooms: ``partitions``
(ownership: rebalances, restore, fencing, stalls), ``intake`` (fetch, isolate, park), ``deciding`` (decide,
queue the records), ``tasks`` (agents running), ``local`` (its own steps: eager starts, and on a takeover),
``timers`` and ``due`` (deadlines and retries), ``checkpoint`` (which inputs are finished: the offsets
each transaction commits), ``txn`` (one transaction per batch of a partition), ``records`` (the records a
decision writes), ``clients`` (the Kafka clients); ``runtime`` runs them from start to stop, as it runs a
pool's executor, and ``metrics`` reads them through a port (``Measured``).

Effectively once: everything is read ``read_committed`` and each partition's decisions are written in
Kafka transactions with the input offsets they finish (a lazy input's may follow: ``streams.checkpoint``),
so a run's events, tasks and state are one history at every moment; a crash loses a whole uncommitted
batch, whose inputs are re-delivered and decided again. An agent runs eagerly once its decision is
committed, or before if that decision can only be made again alike (``streams.deciding``), or from its
task record read back. With ``worker.task_records`` off the steps run here write no task record: after a
crash or a rebalance, the new owner starts the attempts the restored states await (``streams.local``).
Either way a crash before the result is committed runs the same attempt again under the same idempotency
key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.kafka.connect import AUTHORIZATION_ERRORS, start_error
from calmrun.kafka.topics import Topics, ensure_topics, partition_for
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams import brokers, clients
from calmrun.streams.attempts import Attempts
from calmrun.streams.checkpoint import Checkpoint, Pending
from calmrun.streams.deciding import Deciding
from calmrun.streams.due import DueTimers
from calmrun.streams.intake import Intake
from calmrun.streams.liveness import Liveness
from calmrun.streams.local import EagerStarts, Resumption
from calmrun.streams.metrics import Gauges, WorkerMetrics
from calmrun.streams.partitions import Partitions
from calmrun.streams.readiness import Readiness, readiness
from calmrun.streams.runtable import RunTable
from calmrun.streams.runtime import Loop, Runtime, wall_ms
from calmrun.streams.stamps import Stamps
from calmrun.streams.stats import WorkerStats, snapshot
from calmrun.streams.tasks import Source, TaskRunner
from calmrun.streams.throttle import Throttle
from calmrun.streams.timers import Timers
from calmrun.streams.txn import Gate, PartitionWriter
from calmrun.streams.versions import Pinning, VersionAssignor
from calmrun.tracing import tracing_for
from calmrun.wire.codec import wire_codec
from calmrun.workflow.definition import DEFAULT_POOL, WorkflowDef
from calmrun.workflow.events import StepResult, StepTask
from calmrun.workflow.registry import Definitions, check_children

log = logging.getLogger("calmrun.worker")

__all__ = ["Worker", "wall_ms"]


class Worker(Runtime):
    """Runs the given workflows until stopped; use ``async with Worker(...)``, ``start()``/``stop()`` or
    ``run()`` as a process's main job.

    Args:
        settings: Kafka, worker and model configuration.
        workflows: the definitions this worker runs, several versions of a workflow included (each run is
            decided with the version it is pinned to; see ``streams.versions``).
        agents: resolves the agent references of the steps.
        models: resolves model aliases to pydantic-ai models.
        clock: wall-clock milliseconds; time enters the decider only through the inputs it stamps.
        metrics: Prometheus metrics of this worker (``/metrics`` when ``settings.metrics.port``).
        stamps: what requests are stamped with (tenant spend, planner figures); by default read from the
            cost aggregator's topics as the settings and workflows need.
        pool: the pool whose steps this worker executes itself (``"default"``: the steps that name no
            pool, eagerly); ``None`` decides only. Pooled steps are executed by ``PoolExecutor``s, whose
            results this worker reads from the results topic. Every worker of a group must agree.
    """

    def __init__(
        self,
        settings: Settings,
        workflows: Sequence[WorkflowDef],
        agents: AgentRegistry,
        models: ModelRegistry,
        *,
        clock: Callable[[], int] = wall_ms,
        metrics: WorkerMetrics | None = None,
        stamps: Stamps | None = None,
        pool: str | None = DEFAULT_POOL,
    ) -> None:
        super().__init__("worker", log, settings.worker.gc_threshold)
        self.settings = settings
        self.workflows = Definitions(check_workflow(wf, settings) for wf in workflows)
        check_children(self.workflows.values())  # child workflows served here, and in no circle
        self.assignor = VersionAssignor.for_worker(self.workflows.pins())
        self.agents, self.models, self.clock = agents, models, clock
        self.topics = Topics(settings.kafka.prefix)
        self.codec = wire_codec(settings.wire)
        self.metrics = metrics
        self.redactor = Redactor(settings.redact)
        self.stamps = stamps or Stamps(settings, self.workflows.values(), self._known)
        self.n = settings.kafka.partitions
        self._checkpoint = Checkpoint()  # the one owner of "this input is finished"
        self._gate = Gate(settings.worker.max_unacked)
        self._timers = Timers()
        self.throttle = Throttle(settings.throttle, self.workflows.values(), models.aliases)
        self.tracing = tracing_for(settings, pool=pool)  # off unless settings.tracing.endpoint
        self.attempts = Attempts(settings, agents, models, self.throttle, clock, self.tracing, metrics)
        self.tasks = TaskRunner(
            settings.worker.max_in_flight,
            self._execute,
            lambda p, task: self.parts.admit(p, task),  # the partitions are made next, with the runner
            self._accept,
            self._on_result,
            self._checkpoint,
            self._fail,
            self.throttle.hold,
            settings.throttle.max_waiting,
        )
        self.pool = pool
        steps = self.topics.step_topics(self.workflows.values(), pool) if pool is not None else []
        local = list(dict.fromkeys(steps))  # every version's steps, once
        self._local = set(local)  # step topics whose tasks this worker executes
        w = settings.worker  # with eager starts, its own steps' tasks need no record (streams.deciding)
        self._unrecorded = frozenset(local if w.eager and not w.task_records else ())
        pooled = pool is None or any(s.pool != pool for wf in self.workflows.values() for s in wf.steps)
        results = [self.topics.results] if pooled else []  # only a group with pools has results to read
        self.input_topics = [self.topics.requests, *results, *local]
        self.parts = Partitions(
            self.topics,
            self.codec,
            self.input_topics,
            self._checkpoint,
            self._timers,
            self.tasks,
            self._writer,
            lambda tp, rec, exc: self.intake.park(rec, exc, None, None),
            self._fail,
            settings.worker.session_timeout_s,
        )
        eager = EagerStarts(
            self.parts, self.tasks, self.attempts, self._local, self._unrecorded, self._stopped
        )
        self.decisions = Deciding(
            settings,
            self.topics,
            self.codec,
            self.parts,
            self._timers,
            self.redactor,
            clock,
            metrics,
            eager.start,
            self.tracing,
            self._unrecorded,
        )
        self.intake = Intake(
            settings,
            self.topics,
            self.codec,
            self.workflows,
            self.parts,
            self._checkpoint,
            self.tasks,
            self.decisions,
            self.stamps.request,
            self._fail,
            clock,
            self.redactor.text,
        )
        self.pins = self.intake.pins = Pinning(
            self.workflows, self.topics, self.parts, self.decisions, self.assignor, self.intake.command
        )
        self.parts.on_assigned = self.pins.after_assignment
        self.resume = Resumption(
            self.parts,
            self.workflows,
            self.pins,
            self.tasks,
            self.topics,
            self.codec,
            self._unrecorded,
            self._stopped,
        ).resume  # attempts with no task record, started again on a takeover (streams.local)
        self.parts.on_taken = self.resume
        interval = settings.worker.timer_interval_s
        self.due = DueTimers(
            self._timers, self.parts, self.pins, self.workflows, self.decisions, self.tasks, clock, interval
        )
        self.liveness: Liveness | None = None

    @property
    def owned(self) -> set[int]:
        """The partitions this worker owns now."""
        return self.parts.owned

    @property
    def runs(self) -> dict[int, RunTable]:
        """The runs of the owned partitions."""
        return self.parts.runs

    @property
    def stats(self) -> WorkerStats:
        """The rooms' counters, now."""
        self.decisions.counts.peak_unacked = self._gate.peak
        self.decisions.counts.transactions = self._checkpoint.transactions
        return snapshot(self.intake.counts, self.tasks.counts, self.parts.counts, self.decisions.counts)

    @property
    def uncommitted(self) -> int:
        """Decisions made and not yet committed (on all partitions)."""
        return self._gate.pending

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer (None before ``start``)."""
        return self.parts.consumer

    def gauges(self) -> Gauges:
        """What this worker's metrics show, now (``streams.metrics.Measured``)."""
        return Gauges.read(self.workflows, self.runs.values(), self.pins.waiting(), self.throttle)

    def readiness(self) -> Readiness:
        """Is this worker deciding yet (``streams.readiness``)."""
        return readiness(self)

    # -- lifecycle: streams.runtime runs it ---------------------------------------------------------

    async def _open(self) -> list[tuple[str, Loop]]:
        """Create topics, join the group (restoring the assigned partitions' runs); the loops to run."""
        k = self.settings.kafka
        await ensure_topics(k, self.workflows.values())
        restorer = self.parts.restorer = clients.restorer(self.settings)
        consumer = self.parts.consumer = clients.group_consumer(self.settings, self.assignor)
        try:
            await restorer.start()
            if self.settings.worker.liveness.enabled:  # a killed peer leaves the group in about a second
                # before joining: its topic is created and its clients connect outside the first rebalance
                self.liveness = Liveness.of(self.settings, consumer)
                await self.liveness.start()
            consumer.subscribe(topics=self.input_topics, listener=self.parts.listener())
            await consumer.start()
        except (KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:  # an ACL, TLS/SASL, or no broker
            if self.liveness is not None:  # started before the join: no beats for a worker that failed
                await self.liveness.stop()
                self.liveness = None
            await self._close_clients()
            raise (await start_error(k, exc)) from exc
        if self.metrics is not None:
            await self.metrics.start(self)
        await self.stamps.start()
        log.info("worker started: workflows %s, group %s", sorted(self.workflows), self.settings.group_id)
        return [
            ("calmrun-poll", self.intake.run(self._gate.room)),
            ("calmrun-timer", self.due.run()),
            ("calmrun-commit", self._commit_loop()),
            ("calmrun-watch", self.parts.watch()),
            ("calmrun-brokers", brokers.BrokerWatch.of(self).run()),
        ]

    async def _close(self) -> None:
        """Cancel running agents (their tasks are re-delivered), commit the decided, leave."""
        await self.tasks.cancel(set(range(self.n)))
        # what is decided is committed even after a failure: a failed writer's own flush returns at once
        writers = list(self.parts.writers.values())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(wr.flush() for wr in writers if wr.failed is None)), 30)
        self.parts.owned.clear()
        self.parts.writers.clear()
        await asyncio.gather(*(wr.close() for wr in writers))
        if self.metrics is not None:
            await self.metrics.stop()
        await asyncio.gather(self.stamps.stop(), self.attempts.close())
        if self.liveness is not None:  # beats until the writers are flushed: peers wait for the leave
            await self.liveness.stop()
        await self._close_clients()
        self.tracing.close()

    async def _close_clients(self) -> None:
        for client in (self.parts.consumer, self.parts.restorer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    def _writer(self, p: int) -> PartitionWriter:
        producer = clients.transactional_producer(self.settings, p)
        w, group = self.settings.worker, self.settings.group_id
        return PartitionWriter(
            p,
            producer,
            group,
            self._checkpoint,
            self._gate,
            self.parts.lost,
            w.inline_wait_ms / 1000,
            linger_s=w.busy_linger_ms / 1000,
            linger_from=w.busy_linger_from,
        )

    # -- loops --------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commit input offsets that moved without a decision of their own (task records settled by an
        earlier one) or with lazy decisions only (``PartitionWriter.add``)."""
        while True:
            await asyncio.sleep(self.settings.worker.commit_interval_s)
            for wr in list(self.parts.writers.values()):
                wr.kick()

    # -- tasks --------------------------------------------------------------------------------------

    async def _execute(self, task: StepTask) -> StepResult:
        state = self.parts.state(partition_for(task.run_id, self.n), task.run_id)
        return await self.attempts.run(task, functools.partial(self.redactor.text, state=state))

    async def _accept(self, p: int) -> bool:
        return await self.parts.accept(p) and not self._stopped.is_set()

    def _on_result(
        self, p: int, task: StepTask, result: StepResult, source: Source, pending: list[Pending]
    ) -> None:
        state = self.parts.state(p, task.run_id)
        wf = self.workflows.pinned(state.workflow, state.version, state.digest) if state else None
        if wf is None:  # only tasks of runs served here are started: the run was dropped meanwhile
            return
        # lazy: a task record re-read once this is committed finds its attempt decided (``task_ignored``)
        self.decisions.decide(p, wf, state, result, source, pending, lazy=True)

    def _known(self, run_id: str) -> bool:
        return run_id in self.parts.runs.get(partition_for(run_id, self.n), ())

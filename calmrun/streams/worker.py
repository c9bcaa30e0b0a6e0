"""The worker: composes the rooms of the shell over Kafka, and runs them from start to stop.

All calmrun topics are co-partitioned by run ID and consumed by one group whose assignor keeps them
co-partitioned (``streams.versions``), so partition N of every topic belongs to one worker: it holds the state
of those runs, executes their default-pool step tasks (a pooled step's result comes back on the results topic
from its executors, ``streams.pool``), and is the only writer of their state. Rooms: ``partitions``
(ownership: rebalances, restore, fencing, stalls), ``intake`` (fetch, isolate, park), ``deciding`` (decide,
queue the records), ``tasks`` (agents running), ``timers`` (deadlines and retries), ``txn`` (one transaction
per batch of a partition), ``records`` (the records a decision writes), ``clients`` (the Kafka clients).

Effectively once: everything is read ``read_committed`` and each partition's decisions are written in
Kafka transactions with the input offsets they finish, so a run's events, tasks and state are one
history at every moment; a crash loses a whole uncommitted batch, whose inputs are re-delivered and
decided again. An agent runs eagerly once its decision is committed, or before if that decision can only be
made again alike (``streams.deciding``), or from its task record read back. With ``worker.task_records``
off the steps run here write no task record: after a crash or a rebalance, the new owner starts the
attempts the restored states await (``resume``). Either way a crash before the result is committed runs
the same attempt again under the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable, Sequence

from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.errors import WorkerError
from calmrun.gctune import settle_heap
from calmrun.kafka.connect import AUTHORIZATION_ERRORS, start_error
from calmrun.kafka.topics import Topics, ensure_topics, partition_for
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams import brokers, clients
from calmrun.streams.attempts import Attempts
from calmrun.streams.deciding import Deciding
from calmrun.streams.intake import Intake
from calmrun.streams.liveness import Liveness
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.offsets import OffsetTracker, Pending
from calmrun.streams.partitions import Partitions
from calmrun.streams.records import Out, task_out
from calmrun.streams.runtable import RunTable
from calmrun.streams.stamps import Stamps
from calmrun.streams.stats import WorkerStats, snapshot
from calmrun.streams.tasks import Source, TaskRunner
from calmrun.streams.throttle import Throttle
from calmrun.streams.timers import Timers
from calmrun.streams.txn import Gate, PartitionWriter
from calmrun.streams.versions import Pinning, VersionAssignor
from calmrun.tracing import tracing_for
from calmrun.wire.codec import wire_codec
from calmrun.workflow.decider import awaited_tasks
from calmrun.workflow.definition import DEFAULT_POOL, WorkflowDef
from calmrun.workflow.events import StepResult, StepTask, TimerFired
from calmrun.workflow.registry import Definitions, check_children
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Worker:
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
        self._offsets = OffsetTracker()
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
            self._offsets,
            self._timers,
            self.tasks,
            self._writer,
            lambda tp, rec, exc: self.intake.park(rec, exc, None, None),
            self._fail,
            settings.worker.session_timeout_s,
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
            self._start_eager,
            self.tracing,
            self._unrecorded,
        )
        self.intake = Intake(
            settings,
            self.topics,
            self.codec,
            self.workflows,
            self.parts,
            self._offsets,
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
        self.parts.on_taken = self.resume
        self._loops: list[asyncio.Task[None]] = []
        self._failed: BaseException | None = None
        self._stopped = asyncio.Event()  # set by stop() or by a failure: run_until_stopped() returns
        self.closing = False  # stop() has run (or is running)
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
        return snapshot(self.intake.counts, self.tasks.counts, self.parts.counts, self.decisions.counts)

    @property
    def failure(self) -> BaseException | None:
        """Why the worker stopped on its own, if it did."""
        return self._failed

    @property
    def uncommitted(self) -> int:
        """Decisions made and not yet committed (on all partitions)."""
        return self._gate.pending

    # -- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Create topics, join the group, restore state for the assigned partitions and start processing.

        Raises:
            BrokerUnavailableError: the broker does not answer.
            KafkaAuthError: TLS, SASL or the protocol does not match the broker's.
            KafkaAuthorizationError: an ACL refuses a topic, the group or the transactional IDs.
        """
        k = self.settings.kafka
        await ensure_topics(k, self.workflows.values())
        restorer = self.parts.restorer = clients.restorer(self.settings)
        consumer = self.parts.consumer = clients.group_consumer(self.settings, self.assignor)
        try:
            await restorer.start()
            consumer.subscribe(topics=self.input_topics, listener=self.parts.listener())
            await consumer.start()
        except (KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:  # an ACL, TLS/SASL, or no broker
            await self._close_clients()
            raise (await start_error(k, exc)) from exc
        if self.settings.worker.liveness.enabled:  # a killed peer leaves the group in about a second
            self.liveness = Liveness.of(self.settings, consumer)
            await self.liveness.start()
        if self.metrics is not None:
            await self.metrics.start(self)
        await self.stamps.start()
        self._loops = [
            asyncio.create_task(self._guarded(self.intake.run(self._gate.room)), name="calmrun-poll"),
            asyncio.create_task(self._guarded(self._timer_loop()), name="calmrun-timer"),
            asyncio.create_task(self._guarded(self._commit_loop()), name="calmrun-commit"),
            asyncio.create_task(self._guarded(self.parts.watch()), name="calmrun-watch"),
            asyncio.create_task(self._guarded(brokers.BrokerWatch.of(self).run()), name="calmrun-brokers"),
        ]
        log.info("worker started: workflows %s, group %s", sorted(self.workflows), self.settings.group_id)

    async def stop(self) -> None:
        """Stop fetching, cancel running agents (their tasks are re-delivered), commit the decided, leave."""
        if self.closing:
            return
        self.closing = True
        self._stopped.set()
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
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

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """A process's main job: start, settle the heap, run until SIGINT/SIGTERM or a failure, stop.

        Raises:
            WorkerError: as ``run_until_stopped``.
        """
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[None]] = []
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, lambda: stopping.append(asyncio.create_task(self.stop())))
        try:
            await self.start()
            settle_heap(self.settings.worker.gc_threshold)
            if on_started is not None:
                on_started()
            await self.run_until_stopped()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            for t in stopping:
                await t
            await self.stop()

    async def run_until_stopped(self) -> None:
        """Block until ``stop()`` is called or the worker fails.

        Raises:
            WorkerError: a transaction failed for a reason other than fencing, or a storm of records
                failed unexpectedly; nothing after the last commit is lost, it is re-delivered.
        """
        await self._stopped.wait()
        if self._failed is not None:
            raise WorkerError(f"worker stopped: {self._failed!r}") from self._failed

    def _fail(self, exc: BaseException) -> None:
        log.error("worker failing: %r", exc)
        if self._failed is None:
            self._failed = exc
        self._stopped.set()
        for t in self._loops:
            t.cancel()

    async def _guarded(self, loop: object) -> None:
        """Run one of the worker's loops; anything it raises stops the worker."""
        try:
            await loop  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    def _writer(self, p: int) -> PartitionWriter:
        producer = clients.transactional_producer(self.settings, p)

        def committed(positions: dict[TopicPartition, int]) -> None:
            self._offsets.committed(positions)
            self.decisions.counts.transactions += 1

        def positions(part: int) -> dict[TopicPartition, int]:
            return {tp: off for tp, off in self._offsets.to_commit().items() if tp.partition == part}

        w, group = self.settings.worker, self.settings.group_id
        return PartitionWriter(
            p,
            producer,
            group,
            positions,
            committed,
            self._gate,
            self.parts.lost,
            w.inline_wait_ms / 1000,
            w.busy_linger_ms / 1000,
            w.busy_linger_from,
        )

    # -- loops --------------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        interval = self.settings.worker.timer_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.parts.stable.is_set():
                self.fire_due_timers(self.clock())

    def fire_due_timers(self, now: int) -> None:
        """Give the decider a TimerFired for every owned run whose deadline or retry time has come."""

        def live(p: int, run_id: str) -> RunState | None:
            table = self.parts.runs.get(p)
            state = table.get_live(run_id) if p in self.parts.owned and table is not None else None
            return state if state is not None and self.pins.serves(state) else None  # else: it waits

        def fire(p: int, state: RunState) -> None:
            wf = self.workflows.pinned(state.workflow, state.version, state.digest)
            assert wf is not None  # live() gave only runs served here
            self.decisions.decide(p, wf, state, TimerFired(state.run_id, now), None, ())

        self._timers.fire(now, live, self.tasks, fire)

    async def _commit_loop(self) -> None:
        """Commit input offsets that moved without a decision (task records finished by an earlier one)."""
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
        self.decisions.decide(p, wf, state, result, source, pending)

    def _start_eager(
        self, p: int, tasks: list[tuple[Out, StepTask]], committed: bool
    ) -> list[asyncio.Future[None]]:
        """Start the tasks of a decision (eager execution; see the module docstring): once it is committed,
        or before (``committed`` False) where a crash can only repeat that decision."""
        if p not in self.parts.owned or self._stopped.is_set():
            return []
        # not a pool's, not already running here (read back before this callback), still awaited
        mine = [
            (out, task)
            for out, task in tasks
            if out.topic in self._local
            and task.idempotency_key not in self.tasks
            and self.parts.awaited(p, task)
        ]
        if committed:  # a first run whose decision is committed never ran anywhere: its journal is empty
            self.attempts.first_runs((t, self.parts.state(p, t.run_id)) for _, t in mine)
        return list(self.tasks.start_eager(p, mine, self.parts.awaited, self._unrecorded))

    def resume(self, parts: set[int]) -> None:
        """Start the attempts that the runs of ``parts``, just taken over, await and that have no task record
        (steps run here, ``worker.task_records`` off), unless they run here already.

        Each is rebuilt from the state (``awaited_tasks``: same attempt, key and input) and is not a first
        run (its journal is read). An attempt waiting for its retry is not in flight: its timer issues it.
        A run pinned to a version not served here waits, as its inputs do (``streams.versions``).
        """
        if not self._unrecorded or self._stopped.is_set():
            return
        resumed = 0
        for p in sorted(parts & self.parts.owned):
            table = self.parts.runs.get(p)
            for _, state in table.live() if table is not None else ():
                wf = self.workflows.pinned(state.workflow, state.version, state.digest)
                if wf is None or not self.pins.serves(state):
                    continue
                tasks = [(task_out(self.topics, self.codec, p, t), t) for t in awaited_tasks(wf, state)]
                resumed += self.tasks.resume(p, [(o, t) for o, t in tasks if o.topic in self._unrecorded])
        log.info("partitions %s taken over: %d attempts resumed from states", sorted(parts), resumed)

    def _known(self, run_id: str) -> bool:
        return run_id in self.parts.runs.get(partition_for(run_id, self.n), ())

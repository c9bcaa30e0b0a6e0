"""The worker: composes the rooms of the shell over Kafka and turns each decision into its records.

All calmrun topics are co-partitioned by run ID and consumed by one group with the range assignor, so
partition N of every topic belongs to one worker: it holds the state of those runs, executes their step
tasks, and is the only writer of their state. The rooms, each one job:

- ``partitions``: ownership (rebalances, restore, fencing, stalls);
- ``intake``: fetch, handle each record in isolation, park what cannot be handled;
- ``tasks``: the agents executing, ``max_in_flight`` at once;
- ``timers``: when a run's deadline or retry time comes;
- ``txn``: each partition's decisions, states and finished offsets committed in one transaction;
- ``records``: the records a decision writes.

Effectively once: everything is read ``read_committed`` and each partition's decisions are written in
Kafka transactions with the input offsets they finish, so a run's events, tasks and state are one
history at every moment; a crash loses a whole uncommitted batch, whose inputs are re-delivered and
decided again. Agents run only for committed tasks: eagerly, once the decision that scheduled them is
committed here, or from their record read back; a crash before the result is committed runs the same
attempt again under the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry, ModelRegistry, execute
from calmrun.codec import RecordCodec, wire_models
from calmrun.connect import AUTHORIZATION_ERRORS, client_kwargs, start_error
from calmrun.costs.metrics import WorkerMetrics
from calmrun.costs.pricing import Pricing
from calmrun.costs.totals import TenantSpend
from calmrun.errors import CalmrunError, WorkerError
from calmrun.gctune import settle_heap
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams.dlq import MAX_KEY_BYTES, DlqRecord
from calmrun.streams.intake import Intake
from calmrun.streams.offsets import OffsetTracker, Pending
from calmrun.streams.partitions import Partitions
from calmrun.streams.records import Out, StateOut, dlq_out, event_out, task_out
from calmrun.streams.runtable import RunTable
from calmrun.streams.tasks import LocalSource, Source, TaskRunner
from calmrun.streams.timers import Timers
from calmrun.streams.topics import Topics, ensure_topics, partition_for
from calmrun.streams.txn import Gate, PartitionWriter, transactional_id
from calmrun.workflow.decider import Decision, awaits, decide, expired
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import (
    DeciderInput,
    RunEvent,
    RunRequest,
    RunRequested,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")

_TXN_RETRY_BACKOFF_MS = 5
# A transaction begun right after a commit meets the broker still writing the last one's markers
# (CONCURRENT_TRANSACTIONS; NOT_ENOUGH_REPLICAS to a client of aiokafka's protocol version) and is retried
# after this; aiokafka's 100 ms default doubled every commit cycle (31 -> 14 ms median with 10 ms, 5.8 ms
# with 5 ms, measured on the dev broker).


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class WorkerStats:
    """Counters a test or the CLI can read; Prometheus metrics mirror them (a snapshot of the rooms')."""

    requests: int = 0
    tasks_started: int = 0
    tasks_eager: int = 0
    tasks_echoed: int = 0
    tasks_skipped: int = 0
    decisions: int = 0
    ignored: int = 0
    poison: int = 0
    quarantined: int = 0
    completed: int = 0
    running: int = 0
    peak_running: int = 0
    peak_unacked: int = 0  # decisions submitted but not yet committed, at most (see max_unacked)
    restored_runs: int = 0
    restored_partitions: int = 0
    kept_partitions: int = 0  # partitions given back by a rebalance with their runs still in memory
    fenced: int = 0  # partitions lost because another worker took them over (their writes were refused)
    transactions: int = 0


@dataclass
class _Counts:
    decisions: int = 0
    ignored: int = 0
    quarantined: int = 0
    completed: int = 0
    transactions: int = 0


class Worker:
    """Runs the given workflows until stopped; use ``async with Worker(...)``, ``start()``/``stop()`` or
    ``run()`` as a process's main job.

    Args:
        settings: Kafka, worker and model configuration.
        workflows: the definitions this worker runs; every worker of one group must run the same set.
        agents: resolves the agent references of the steps.
        models: resolves model aliases to pydantic-ai models.
        clock: wall-clock milliseconds; time enters the decider only through the inputs it stamps.
        metrics: Prometheus metrics of this worker (``/metrics`` when ``settings.metrics.port``).
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
    ) -> None:
        self.settings = settings
        self.workflows = {wf.name: check_workflow(wf, settings) for wf in workflows}
        self.agents, self.models, self.clock = agents, models, clock
        self.topics = Topics(settings.kafka.prefix)
        self.codec = RecordCodec(wire_models())
        self.metrics = metrics
        self.pricing = Pricing.from_settings(settings)
        self.redactor = Redactor(settings.redact)
        # tenant budgets need each tenant's spend in its window, from the cost aggregator's output
        self.tenant_spend = TenantSpend(settings) if settings.budgets.tenants else None
        self.n = settings.kafka.partitions
        self._counts = _Counts()
        self._offsets = OffsetTracker()
        self._gate = Gate(settings.worker.max_unacked)
        self._timers = Timers()
        self.tasks = TaskRunner(
            settings.worker.max_in_flight,
            self._execute,
            self._admit,
            self._accept,
            self._on_result,
            self._fail,
        )
        self.input_topics = [self.topics.requests, *self.topics.step_topics(self.workflows.values())]
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
        self.intake = Intake(
            settings,
            self.topics,
            self.codec,
            self.workflows,
            self.parts,
            self._offsets,
            self.tasks,
            self,
            clock,
            self.redactor.text,
        )
        self._loops: list[asyncio.Task[None]] = []
        self._failed: BaseException | None = None
        self._stopped = asyncio.Event()  # set by stop() or by a failure: run_until_stopped() returns
        self._closing = False  # stop() has run (or is running)

    @property
    def owned(self) -> set[int]:
        """The partitions this worker owns now."""
        return self.parts.owned

    @property
    def runs(self) -> dict[int, RunTable]:
        """The runs of the owned partitions."""
        return self.parts.runs

    @property
    def _consumer(self) -> AIOKafkaConsumer | None:
        return self.parts.consumer

    @property
    def stats(self) -> WorkerStats:
        c, t, p, i = self._counts, self.tasks.counts, self.parts.counts, self.intake.counts
        return WorkerStats(
            requests=i.requests,
            tasks_started=t.started,
            tasks_eager=t.eager,
            tasks_echoed=t.echoed,
            tasks_skipped=i.tasks_skipped,
            decisions=c.decisions,
            ignored=c.ignored,
            poison=i.poison,
            quarantined=c.quarantined,
            completed=c.completed,
            running=t.running,
            peak_running=t.peak_running,
            peak_unacked=self._gate.peak,
            restored_runs=p.restored_runs,
            restored_partitions=p.restored_partitions,
            kept_partitions=p.kept_partitions,
            fenced=p.fenced,
            transactions=c.transactions,
        )

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
        k, w = self.settings.kafka, self.settings.worker
        await ensure_topics(k, self.workflows.values())
        # "earliest": with the default "latest", the reset that assign() starts in the background can land
        # after our explicit seek and silently skip the whole state partition
        restorer = self.parts.restorer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            client_id=f"{k.client_id}-restore",
            **client_kwargs(k),
        )
        session_ms = round(w.session_timeout_s * 1000)
        consumer = self.parts.consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            group_id=self.settings.group_id,
            group_instance_id=w.instance_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_interval_ms=600_000,
            rebalance_timeout_ms=max(session_ms, 30_000),
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=min(1000, session_ms // 3),
            **client_kwargs(k),
        )
        try:
            await restorer.start()
            consumer.subscribe(topics=self.input_topics, listener=self.parts.listener())
            await consumer.start()
        except (KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:  # an ACL, TLS/SASL, or no broker
            await self._close_clients()
            raise (await start_error(k, exc)) from exc
        if self.metrics is not None:
            await self.metrics.start(self)
        if self.tenant_spend is not None:
            await self.tenant_spend.start()
        self._loops = [
            asyncio.create_task(self._guarded(self.intake.run(self._gate.room)), name="calmrun-poll"),
            asyncio.create_task(self._guarded(self._timer_loop()), name="calmrun-timer"),
            asyncio.create_task(self._guarded(self._commit_loop()), name="calmrun-commit"),
            asyncio.create_task(self._guarded(self.parts.watch()), name="calmrun-watch"),
        ]
        log.info("worker started: workflows %s, group %s", sorted(self.workflows), self.settings.group_id)

    async def stop(self) -> None:
        """Stop fetching, cancel running agents (their tasks are re-delivered), commit the decided, leave."""
        if self._closing:
            return
        self._closing = True
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
        if self.tenant_spend is not None:
            await self.tenant_spend.stop()
        await self._close_clients()

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

    def fail(self, exc: BaseException) -> None:
        """Stop the worker because of ``exc`` (``run_until_stopped`` raises it)."""
        self._fail(exc)

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
        k = self.settings.kafka
        producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap,
            client_id=f"{k.client_id}-tx-{p}",
            transactional_id=transactional_id(self.settings.group_id, p),
            enable_idempotence=True,
            acks="all",
            linger_ms=k.linger_ms,
            max_batch_size=256 * 1024,
            retry_backoff_ms=_TXN_RETRY_BACKOFF_MS,
            max_request_size=k.max_request_size,
            **client_kwargs(k),
        )

        def committed(positions: dict[TopicPartition, int]) -> None:
            self._offsets.committed(positions)
            self._counts.transactions += 1

        def positions(part: int) -> dict[TopicPartition, int]:
            return {tp: off for tp, off in self._offsets.to_commit().items() if tp.partition == part}

        return PartitionWriter(
            p, producer, self.settings.group_id, positions, committed, self._gate, self.parts.lost
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
        for p, run_id in self._timers.due(now):
            table = self.parts.runs.get(p)
            state = table.get_live(run_id) if table is not None else None  # a finished run has no timers
            if p not in self.parts.owned or state is None:
                continue
            due = state.next_due_ms()
            if due is None:
                continue
            if due > now:
                self._timers.push(due, p, run_id)
                continue
            if any(key in self.tasks for key in expired(state, now)):
                # still running here (started late behind a backlog): its own timeout will end it
                self._timers.push(now + 1000, p, run_id)
                continue
            self.decide(p, self.workflows[state.workflow], state, TimerFired(run_id, now), None, ())

    async def _commit_loop(self) -> None:
        """Commit input offsets that moved without a decision (task records finished by an earlier one)."""
        while True:
            await asyncio.sleep(self.settings.worker.commit_interval_s)
            for wr in list(self.parts.writers.values()):
                wr.kick()

    # -- tasks --------------------------------------------------------------------------------------

    async def _execute(self, task: StepTask) -> StepResult:
        p = partition_for(task.run_id, self.n)
        scrub = functools.partial(self.redactor.text, state=self.parts.state(p, task.run_id))
        return await execute(
            task,
            self.agents,
            self.models,
            now_ms=self.clock,
            pricing=self.pricing,
            scrub=scrub,
            limits=self.settings.limits,
        )

    async def _admit(self, p: int, task: StepTask) -> bool:
        # queued behind the slots: check again, as a pause may have handed the partition over
        await self.parts.revalidate_if_stalled()
        if not await self.parts.accept(p):
            return False
        state = self.parts.state(p, task.run_id)
        return state is not None and awaits(state, task.step, task.attempt, task.kind)

    async def _accept(self, p: int) -> bool:
        return await self.parts.accept(p) and not self._stopped.is_set()

    def _on_result(
        self, p: int, task: StepTask, result: StepResult, source: Source, pending: list[Pending]
    ) -> None:
        state = self.parts.state(p, task.run_id)
        self.decide(p, self.workflows[task.workflow], state, result, source, pending)

    def _start_committed(self, p: int, tasks: list[tuple[Out, StepTask]]) -> None:
        """Start the tasks of a decision just committed (eager execution; see the module docstring)."""
        if p not in self.parts.owned or self._stopped.is_set():
            return
        for out, task in tasks:
            state = self.parts.state(p, task.run_id)
            if state is None or not awaits(state, task.step, task.attempt, task.kind):
                continue  # its record was read back first and the attempt has run already
            source = LocalSource(out.topic, p, out.key or b"", out.value or b"", out.headers)
            self.tasks.start(p, task, source, eager=True, pending=[])

    # -- decisions ----------------------------------------------------------------------------------

    def request_input(self, run_id: str, wf: WorkflowDef, body: RunRequest, at_ms: int) -> RunRequested:
        """The decider's input for a request, stamped with the tenant's spend when it has a budget."""
        budget = self.settings.budgets.tenants.get(body.tenant)
        if (
            budget is None
            or self.tenant_spend is None
            or run_id in self.parts.runs.get(partition_for(run_id, self.n), ())
        ):
            return RunRequested(run_id, wf.name, body.input, at_ms, body.tenant, budget_usd=body.budget_usd)
        return RunRequested(
            run_id,
            wf.name,
            body.input,
            at_ms,
            body.tenant,
            budget_usd=body.budget_usd,
            tenant_budget_usd=budget.usd,
            tenant_spent_usd=self.tenant_spend.spent(body.tenant, budget.window, at_ms),
            tenant_window=budget.window,
        )

    def decide(
        self,
        p: int,
        wf: WorkflowDef,
        state: RunState | None,
        inp: DeciderInput,
        source: Source | ConsumerRecord[bytes, bytes] | None,
        pending: Sequence[Pending],
    ) -> Decision:
        """Decide ``inp`` for a run of partition ``p`` and add its records to ``p``'s next transaction."""
        d = decide(wf, state, inp)
        self._counts.decisions += 1
        run_id = inp.run_id
        key = run_id.encode()
        outputs = [self.event_out(p, ev) for ev in d.events]
        if d.ignored:
            self._counts.ignored += 1
            self.submit(p, outputs, pending, d.events)
            return d
        assert d.state is not None
        encoded = self.parts.runs[p].put(run_id, d.state)  # a finished run is encoded now, and kept so
        tasks = [(task_out(self.topics, self.codec, p, t), t) for t in d.tasks]
        outputs += [out for out, _ in tasks]
        if d.quarantine is not None:
            q = d.quarantine
            tb = inp.traceback if isinstance(inp, StepResult) else None
            dlq = DlqRecord(
                reason="quarantined",
                error_type=q.error_type,
                error=q.error,
                traceback=tb,
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
                at_ms=self.clock(),
            )
            outputs.append(self.dlq_out(self.topics.dlq(wf.name), p, key, dlq))
        encode = functools.partial(self.codec.encode, d.state) if encoded is None else lambda: encoded
        state_out = StateOut(self.topics.state, p, key, encode)
        eager = tasks if self.settings.worker.eager else []
        self.submit(p, outputs, pending, d.events, state_out, eager, quarantined=d.quarantine is not None)
        due = d.state.next_due_ms()
        if due is not None:
            self._timers.push(due, p, run_id)
        return d

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
    ) -> None:
        """Add one decision to partition ``p``'s next transaction; its inputs are finished with it."""
        writer = self.parts.writers[p]
        for input_record in pending:
            input_record.finish()

        def on_commit() -> None:
            for ev in events:
                if ev.type == "run.completed":
                    self._counts.completed += 1
                if self.metrics is not None:
                    self.metrics.observe(ev)
            self._counts.quarantined += quarantined
            if eager:
                self._start_committed(p, eager)

        writer.add(outputs, state, on_commit)

    def event_out(self, p: int, ev: RunEvent) -> Out:
        ev = self.redactor.event(ev, self.parts.state(p, ev.run_id))  # settings.redact (calmrun.redact)
        return event_out(self.topics, self.codec, p, ev)

    def dlq_out(self, topic: str, p: int, key: bytes | None, dlq: DlqRecord) -> Out:
        state = self.parts.state(p, dlq.run_id) if dlq.run_id else None
        dlq = self.redactor.dlq(dlq, state, self.codec)  # settings.redact (calmrun.redact)
        # a dead letter always fits its topic, and always encodes (see DlqRecord.fitted)
        dlq = dlq.fitted(self.settings.limits.dlq_max_payload_bytes)
        key = key if key is None or len(key) <= MAX_KEY_BYTES else key[:MAX_KEY_BYTES]
        try:
            return dlq_out(topic, self.codec, p, key, dlq)
        except CalmrunError as exc:
            dlq = dlq.model_copy(update={"key": None, "value": None, "headers": {}, "error": f"{exc}"})
            return dlq_out(topic, self.codec, p, key, dlq.fitted(0))

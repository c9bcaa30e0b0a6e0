"""The worker: consumes run requests and step tasks, runs agents concurrently, applies the decider.

All calmrun topics are co-partitioned by run ID and consumed by one group with the range assignor, so
partition N of every topic belongs to one worker: it holds the state of those runs (restored from the
compacted state topic on assignment), executes their step tasks, and is the only writer of their state.

Delivery is at least once with idempotent transitions: a record's offset is committed only below the
oldest record not yet finished, and a record is finished only when everything it caused is acknowledged
(see ``publisher``). A re-delivered request or task whose effect is recorded is ignored; a task whose
result never arrives is re-issued by the timer from its durable deadline in the run state.

Eager tasks: since the worker that decides a run also owns that run's step partitions, it starts each task
it schedules at once instead of waiting to read the task back from its step topic (the record is written
all the same). When the record arrives it is recognised by its idempotency key and finishes, like any task
record, only once the decision on its result is acknowledged; a crash before that re-delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry, ModelRegistry, execute
from calmrun.codec import RecordCodec, wire_models
from calmrun.costs.metrics import WorkerMetrics
from calmrun.costs.planner import StepStats
from calmrun.costs.pricing import Pricing
from calmrun.costs.spend import TenantSpend
from calmrun.errors import (
    BrokerUnavailableError,
    CalmrunError,
    DecodeError,
    UnknownWorkflowError,
    WorkerError,
)
from calmrun.settings import Settings
from calmrun.streams.dlq import DlqRecord
from calmrun.streams.offsets import OffsetTracker
from calmrun.streams.publisher import LazyOut, Out, Publisher
from calmrun.streams.requests import parse_request
from calmrun.streams.runtable import RunTable
from calmrun.streams.topics import INVALID, Topics, ensure_topics, partition_for, read_to_end
from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import (
    DeciderInput,
    RedriveRequested,
    RunCommand,
    RunEvent,
    RunRequest,
    RunRequested,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Echo:
    """An eagerly started task whose own record has not been read back and finished yet."""

    partition: int
    awaiting_record: bool = True
    settled: bool = False  # the decision on its result is acknowledged
    finishers: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class _LocalSource:
    """Where an eager task came from, for a dead-letter record: its step topic, offset unknown (-1)."""

    topic: str
    partition: int
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    offset: int = -1


@dataclass
class WorkerStats:
    """Counters a test or the CLI can read; Prometheus metrics mirror them."""

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
    peak_unacked: int = 0  # decisions submitted but not yet acknowledged, at most (see max_unacked)
    restored_runs: int = 0


class Worker:
    """Runs the given workflows until stopped; use ``async with Worker(...)`` or ``start()``/``stop()``.

    Args:
        settings: Kafka, worker and model configuration.
        workflows: the definitions this worker runs; every worker of one group must run the same set.
        agents: resolves the agent references of the steps.
        models: resolves model aliases to pydantic-ai models.
        clock: wall-clock milliseconds; time enters the decider only through the inputs it stamps.
    """

    def __init__(
        self,
        settings: Settings,
        workflows: Sequence[WorkflowDef],
        agents: AgentRegistry,
        models: ModelRegistry,
        *,
        clock: Callable[[], int] = wall_ms,
        on_event: Callable[[RunEvent], None] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.workflows = {wf.name: wf for wf in workflows}
        self.agents, self.models, self.clock = agents, models, clock
        self.topics = Topics(settings.kafka.prefix)
        self.codec = RecordCodec(wire_models())
        self.stats = WorkerStats()
        self.on_event = on_event
        self.metrics = metrics
        self.pricing = Pricing.from_settings(settings)
        # tenant budgets need each tenant's spend in its window, from the cost aggregator's output
        self.tenant_spend = TenantSpend(settings) if settings.budgets.tenants else None
        # steps with `choose` start on a rung picked from the cost table's figures, stamped on the request
        choosing = any(sd.choose for wf in self.workflows.values() for sd in wf.steps)
        self.step_stats = StepStats(settings) if choosing else None
        self.n = settings.kafka.partitions
        self.runs: dict[int, RunTable] = {}
        self.owned: set[int] = set()
        self._offsets = OffsetTracker()
        self._executing: dict[tuple[str, str, int, str], asyncio.Task[None]] = {}
        self._echoes: dict[str, _Echo] = {}  # idempotency key -> an eager task's pending echo
        self._slots = asyncio.Semaphore(settings.worker.max_in_flight)
        self._room = asyncio.Event()
        self._room.set()
        self._timers: list[tuple[int, int, str]] = []
        self._loops: list[asyncio.Task[None]] = []
        self._failed: BaseException | None = None
        self._stopped = asyncio.Event()  # set by stop() or by a failure: run_until_stopped() returns
        self._closing = False  # stop() has run (or is running)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self._publisher: Publisher | None = None

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
        """
        k = self.settings.kafka
        await ensure_topics(k, self.workflows.values())
        self._producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap,
            client_id=k.client_id,
            acks="all" if k.acks == "all" else int(k.acks),
            enable_idempotence=k.idempotence,
            linger_ms=k.linger_ms,
            max_batch_size=256 * 1024,
        )
        # "earliest": with the default "latest", the reset that assign() starts in the background can land
        # after our explicit seek and silently skip the whole state partition
        self._restorer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{k.client_id}-restore",
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            group_id=self.settings.group_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_interval_ms=600_000,
            session_timeout_ms=round(self.settings.worker.session_timeout_s * 1000),
            heartbeat_interval_ms=round(self.settings.worker.session_timeout_s * 100),
        )
        try:
            await self._producer.start()
            await self._restorer.start()
            self._publisher = Publisher(self._producer, self._fail, self.settings.worker.max_unacked)
            self._publisher.start()
            topics = [self.topics.requests, *self.topics.step_topics(self.workflows.values())]
            self._consumer.subscribe(topics=topics, listener=_Listener(self))
            await self._consumer.start()
        except KafkaConnectionError as exc:
            await self._close_clients()
            raise BrokerUnavailableError(k.bootstrap, str(exc)) from exc
        if self.metrics is not None:
            await self.metrics.start(self)
        if self.tenant_spend is not None:
            await self.tenant_spend.start()
        if self.step_stats is not None:
            await self.step_stats.start()
        self._loops = [
            asyncio.create_task(self._poll_loop(), name="calmrun-poll"),
            asyncio.create_task(self._timer_loop(), name="calmrun-timer"),
            asyncio.create_task(self._commit_loop(), name="calmrun-commit"),
        ]
        log.info("worker started: workflows %s, group %s", sorted(self.workflows), self.settings.group_id)

    async def stop(self) -> None:
        """Stop fetching, cancel running agents (their tasks are re-delivered), flush, commit, leave."""
        if self._closing:
            return
        self._closing = True
        self._stopped.set()
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._cancel_tasks(set(self.owned))
        if self._publisher is not None and self._failed is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._publisher.drain(), 30)
            await self._commit()
        if self._publisher is not None:
            await self._publisher.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.tenant_spend is not None:
            await self.tenant_spend.stop()
        if self.step_stats is not None:
            await self.step_stats.stop()
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._restorer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    async def run_until_stopped(self) -> None:
        """Block until ``stop()`` is called or the worker fails.

        Raises:
            WorkerError: a produce failed; nothing after the last commit is lost, it is re-delivered.
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

    # -- rebalance ----------------------------------------------------------------------------------

    async def _on_assigned(self, parts: set[int], tps: list[TopicPartition]) -> None:
        # aiokafka applies the assignment before it awaits this callback, so fetching may already run:
        # pause until the state is restored (the poll loop also rewinds anything that slipped through)
        assert self._consumer is not None
        new = parts - self.owned
        if new:
            self._consumer.pause(*[tp for tp in tps if tp.partition in new])
            await self._restore(new)
        self.owned |= parts
        self._consumer.resume(*tps)
        log.info("partitions assigned: %s (restored %d runs)", sorted(parts), self.stats.restored_runs)

    async def _on_revoked(self, parts: set[int]) -> None:
        self.owned -= parts
        await self._cancel_tasks(parts)
        if self._publisher is not None and self._failed is None:
            await self._publisher.drain()
            await self._commit()
        self._offsets.forget(parts)
        self._echoes = {k: e for k, e in self._echoes.items() if e.partition not in parts}
        for p in parts:
            self.runs.pop(p, None)
        self._timers = [t for t in self._timers if t[1] not in parts]
        heapq.heapify(self._timers)

    async def _restore(self, parts: set[int]) -> None:
        """Rebuild the run table of ``parts`` from the compacted state topic, up to its end offset."""
        assert self._restorer is not None
        tps = [TopicPartition(self.topics.state, p) for p in parts]
        for p in parts:
            self.runs[p] = RunTable(self.codec)
        async for rec in read_to_end(self._restorer, tps):
            table = self.runs[rec.partition]
            run_id = rec.key.decode() if rec.key else ""
            if rec.value is None:
                table.pop(run_id)
            else:
                table.put(run_id, self.codec.decode_as(rec.value, RunState), rec.value)
        self._restorer.unsubscribe()
        for p in parts:
            self.stats.restored_runs += len(self.runs[p])
            for run_id, state in self.runs[p].live():
                due = state.next_due_ms()
                if due is not None:
                    heapq.heappush(self._timers, (due, p, run_id))

    async def _cancel_tasks(self, parts: set[int]) -> None:
        doomed = [t for (run_id, *_), t in self._executing.items() if partition_for(run_id, self.n) in parts]
        for t in doomed:
            t.cancel()
        for t in doomed:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- the loops ----------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        assert self._consumer is not None and self._publisher is not None
        limit = self.settings.worker.max_in_flight
        try:
            while True:
                while len(self._executing) >= limit:
                    self._room.clear()
                    await self._room.wait()
                # decisions outrun the producer when agents return at once: fetch no more until it catches up
                await self._publisher.room()
                batch = await self._consumer.getmany(timeout_ms=200, max_records=max(limit, 500))
                for tp, records in batch.items():
                    if tp.partition not in self.owned:
                        # fetched before this partition's state was restored: read it again later
                        self._consumer.seek(tp, records[0].offset)
                        continue
                    for rec in records:
                        self._offsets.consumed(tp, rec.offset)
                        if rec.topic == self.topics.requests:
                            self._on_request(tp, rec)
                        else:
                            self._on_task(tp, rec)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _timer_loop(self) -> None:
        interval = self.settings.worker.timer_interval_s
        try:
            while True:
                await asyncio.sleep(interval)
                self.fire_due_timers(self.clock())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    def fire_due_timers(self, now: int) -> None:
        """Give the decider a TimerFired for every owned run whose deadline or retry time has come."""
        while self._timers and self._timers[0][0] <= now:
            _, p, run_id = heapq.heappop(self._timers)
            table = self.runs.get(p)
            state = table.get_live(run_id) if table is not None else None  # a finished run has no timers
            if p not in self.owned or state is None:
                continue
            due = state.next_due_ms()
            if due is None:
                continue
            if due > now:
                heapq.heappush(self._timers, (due, p, run_id))
                continue
            if any(
                (run_id, name, st.attempt, kind) in self._executing
                for name, st in state.steps.items()
                for kind in ("run", "compensate")
                if st.deadline_ms is not None and st.deadline_ms <= now
            ):
                # still running here (started late behind a backlog): its own timeout will end it
                heapq.heappush(self._timers, (now + 1000, p, run_id))
                continue
            self._decide(p, self.workflows[state.workflow], state, TimerFired(run_id, now), None, None)

    async def _commit_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.settings.worker.commit_interval_s)
                await self._commit()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _commit(self) -> None:
        if self._consumer is None:
            return
        positions = {tp: off for tp, off in self._offsets.to_commit().items() if tp.partition in self.owned}
        if not positions:
            return
        try:
            await self._consumer.commit(positions)
            self._offsets.committed(positions)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit failed (will retry; uncommitted records may be re-delivered): %r", exc)

    # -- records ------------------------------------------------------------------------------------

    def _finisher(self, tp: TopicPartition, offset: int) -> Callable[[], None]:
        return lambda: self._offsets.finished(tp, offset)

    def _on_request(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        self.stats.requests += 1
        fallback = f"{rec.topic}-{rec.partition}-{rec.offset}"
        try:
            run_id, body = parse_request(rec.key, rec.value, self.codec, fallback_id=fallback)
        except DecodeError as exc:
            self._poison(tp, rec, exc, None)
            return
        p = partition_for(run_id, self.n)
        if p != rec.partition:
            # produced by a client with another partitioner (kcat's default, or no key): move it to the
            # partition that owns this run, keyed by the run ID
            out = Out(
                rec.topic,
                p,
                run_id.encode(),
                rec.value,
                (*rec.headers, ("calmrun-moved-from", f"{rec.partition}:{rec.offset}".encode())),
            )
            self._submit([out], None, self._finisher(tp, rec.offset))
            return
        wf_name = body.workflow
        wf = self.workflows.get(wf_name)
        if wf is None:
            self._poison(tp, rec, UnknownWorkflowError(wf_name, list(self.workflows)), None)
            return
        state = self.runs[p].get(run_id)
        inp: DeciderInput
        if isinstance(body, RunCommand):
            inp = RedriveRequested(run_id, rec.timestamp)
        else:
            inp = self._request(run_id, wf, body, rec.timestamp)
        self._decide(p, wf, state, inp, rec, self._finisher(tp, rec.offset))

    def _request(self, run_id: str, wf: WorkflowDef, body: RunRequest, at_ms: int) -> RunRequested:
        """The decider's input for a request, stamped with the tenant's spend when it has a budget."""
        budget = self.settings.budgets.tenants.get(body.tenant)
        known = run_id in self.runs.get(partition_for(run_id, self.n), ())
        stats = self.step_stats.figures(wf, at_ms) if self.step_stats is not None and not known else None
        if budget is None or self.tenant_spend is None or known:
            return RunRequested(
                run_id, wf.name, body.input, at_ms, body.tenant, budget_usd=body.budget_usd, model_stats=stats
            )
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
            model_stats=stats,
        )

    def _on_task(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        if self._echoes and self._echoed(tp, rec):
            return
        try:
            task = self.codec.decode_as(rec.value or b"", StepTask)
        except DecodeError as exc:
            self._poison(tp, rec, exc, None)
            return
        p = rec.partition
        state = self._state(p, task.run_id)
        st = state.steps.get(task.step) if state else None
        expected = "scheduled" if task.kind == "run" else "compensating"
        key = (task.run_id, task.step, task.attempt, task.kind)
        if (
            state is None
            or st is None
            or st.attempt != task.attempt
            or st.status != expected
            or st.deadline_ms is None
            or key in self._executing
        ):
            self.stats.tasks_skipped += 1
            where = f"{st.status} at attempt {st.attempt}" if st else "unknown"
            reason = f"stale task not executed: {task.kind} {task.step!r} #{task.attempt} (step {where})"
            ev = RunEvent(
                run_id=task.run_id,
                seq=-1,
                type="input.ignored",
                at_ms=self.clock(),
                workflow=task.workflow,
                version=task.version,
                tenant=task.tenant,
                step=task.step,
                attempt=task.attempt,
                data={"reason": reason, "input": "StepTask"},
            )
            self._submit([self._event_out(p, ev)], None, self._finisher(tp, rec.offset))
            return
        self.stats.tasks_started += 1
        self._executing[key] = asyncio.create_task(
            self._run_task(rec.partition, rec, task, key, self._finisher(tp, rec.offset))
        )

    def _echoed(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> bool:
        """Is this the record of a task started eagerly here? Then it finishes with that task's result."""
        idem = next((v for k, v in rec.headers if k == "calmrun-idempotency-key"), None)
        echo = self._echoes.get(idem.decode()) if idem is not None else None
        if echo is None or not echo.awaiting_record or echo.partition != rec.partition:
            return False
        assert idem is not None
        self.stats.tasks_echoed += 1
        echo.awaiting_record = False
        if echo.settled:
            del self._echoes[idem.decode()]
            self._offsets.finished(tp, rec.offset)
        else:
            echo.finishers.append(self._finisher(tp, rec.offset))
        return True

    def _start_eager(self, p: int, out: Out, task: StepTask) -> None:
        """Run a task just scheduled here without reading it back; see the module docstring."""
        key = (task.run_id, task.step, task.attempt, task.kind)
        idem = task.idempotency_key
        if key in self._executing or idem in self._echoes:
            return
        echo = self._echoes[idem] = _Echo(p)

        def settle() -> None:
            echo.settled = True
            for finish in echo.finishers:
                finish()
            echo.finishers.clear()
            if not echo.awaiting_record and self._echoes.get(idem) is echo:
                del self._echoes[idem]

        source = _LocalSource(out.topic, p, out.key or b"", out.value or b"", out.headers)
        self.stats.tasks_started += 1
        self.stats.tasks_eager += 1
        self._executing[key] = asyncio.create_task(self._run_task(p, source, task, key, settle))

    async def _run_task(
        self,
        p: int,
        source: ConsumerRecord[bytes, bytes] | _LocalSource,
        task: StepTask,
        key: tuple[str, str, int, str],
        on_done: Callable[[], None],
    ) -> None:
        try:
            async with self._slots:
                self.stats.running += 1
                self.stats.peak_running = max(self.stats.peak_running, self.stats.running)
                try:
                    result = await execute(
                        task, self.agents, self.models, now_ms=self.clock, pricing=self.pricing
                    )
                finally:
                    self.stats.running -= 1
            state = self._state(p, task.run_id)
            if p not in self.owned or self._stopped.is_set():
                log.info("dropping result of %s: partition %d no longer owned", key, p)
                return
            self._decide(p, self.workflows[task.workflow], state, result, source, on_done)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._executing.pop(key, None)
            self._room.set()

    def _state(self, p: int, run_id: str) -> RunState | None:
        table = self.runs.get(p)
        return table.get(run_id) if table is not None else None

    # -- decisions ----------------------------------------------------------------------------------

    def _decide(
        self,
        p: int,
        wf: WorkflowDef,
        state: RunState | None,
        inp: DeciderInput,
        source: ConsumerRecord[bytes, bytes] | _LocalSource | None,
        on_done: Callable[[], None] | None,
    ) -> Decision:
        d = decide(wf, state, inp)
        self.stats.decisions += 1
        run_id = inp.run_id
        key = run_id.encode()
        outputs = [self._event_out(p, ev) for ev in d.events]
        if d.ignored:
            self.stats.ignored += 1
            self._submit(outputs, None, on_done)
            return d
        assert d.state is not None
        encoded = self.runs[p].put(run_id, d.state)  # a finished run is encoded now, and kept so
        tasks = [
            Out(
                self.topics.step(t.workflow, t.step),
                p,
                key,
                self.codec.encode(t),
                (("calmrun-idempotency-key", t.idempotency_key.encode()),),
            )
            for t in d.tasks
        ]
        outputs += tasks
        if d.quarantine is not None:
            self.stats.quarantined += 1
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
            outputs.append(self._dlq_out(self.topics.dlq(wf.name), p, key, dlq))
        if d.state.status == "completed" and any(e.type == "run.completed" for e in d.events):
            self.stats.completed += 1
        encode = functools.partial(self.codec.encode, d.state) if encoded is None else lambda: encoded
        state_out = LazyOut(self.topics.state, p, key, encode)
        self._submit(outputs, state_out, on_done)
        if self.settings.worker.eager and not self._stopped.is_set():
            for out, task in zip(tasks, d.tasks, strict=True):
                self._start_eager(p, out, task)
        due = d.state.next_due_ms()
        if due is not None:
            heapq.heappush(self._timers, (due, p, run_id))
        return d

    def _poison(
        self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes], exc: CalmrunError, workflow: str | None
    ) -> None:
        """Park a record that cannot be processed at all; the processor goes on with the next one."""
        self.stats.poison += 1
        log.warning("poison record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
        dlq = DlqRecord(
            reason="poison",
            error_type=type(exc).__name__,
            error=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            workflow=workflow,
            run_id=None,
            step=None,
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
            key=rec.key,
            value=rec.value,
            headers=dict(rec.headers),
            at_ms=self.clock(),
        )
        topic = self.topics.dlq(workflow or INVALID)
        self._submit(
            [self._dlq_out(topic, rec.partition, rec.key, dlq)], None, self._finisher(tp, rec.offset)
        )

    def _event_out(self, p: int, ev: RunEvent) -> Out:
        if self.on_event is not None:
            self.on_event(ev)
        if self.metrics is not None:
            self.metrics.observe(ev)
        return Out(
            self.topics.events, p, ev.run_id.encode(), self.codec.encode(ev), (("type", ev.type.encode()),)
        )

    def _dlq_out(self, topic: str, p: int, key: bytes | None, dlq: DlqRecord) -> Out:
        headers = (
            ("error", dlq.error_type.encode()),
            ("reason", dlq.reason.encode()),
            ("source", f"{dlq.source_topic}[{dlq.source_partition}]@{dlq.source_offset}".encode()),
        )
        return Out(topic, p, key, self.codec.encode(dlq), headers)

    def _submit(self, outputs: list[Out], state: LazyOut | None, on_done: Callable[[], None] | None) -> None:
        assert self._publisher is not None
        self._publisher.submit(outputs, state, on_done)
        self.stats.peak_unacked = max(self.stats.peak_unacked, self._publisher.pending)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker._on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker._on_assigned({tp.partition for tp in assigned}, list(assigned))

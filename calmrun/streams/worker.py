"""The worker: consumes run requests and step tasks, runs agents concurrently, applies the decider.

All calmrun topics are co-partitioned by run ID and consumed by one group with the range assignor, so
partition N of every topic belongs to one worker: it holds the state of those runs (restored from the
compacted state topic on assignment), executes their step tasks, and is the only writer of their state.

Effectively once: each partition's decisions are written in Kafka transactions (``streams.txn``) with the
input offsets they finish, and everything is read ``read_committed``. A run's events, tasks and state are
therefore always one history: a crash loses a whole uncommitted batch, whose inputs are re-delivered and
decided again against the state that was committed with their predecessors. A worker that lost its
partitions is fenced by the broker when the next owner initialises the partition's transactional id.

Agents run only for committed tasks. The worker that decides a run also owns that run's step partitions,
so it starts each task once its decision is committed instead of reading it back (eager execution); the
record is still read back, recognised by its idempotency key, and finishes with the task's result. A task
record's offset is committed only with the decision on its result, so a crash re-delivers the task and
the same attempt runs again under the same idempotency key.

A rebalance restores only the partitions that are new to this worker: a partition it gets back keeps its
runs in memory when the state topic did not move meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from calmrun.agents import AgentRegistry, ModelRegistry, execute
from calmrun.codec import RecordCodec, wire_models
from calmrun.connect import AUTHORIZATION_ERRORS, client_kwargs, start_error
from calmrun.costs.metrics import WorkerMetrics
from calmrun.costs.pricing import Pricing
from calmrun.costs.totals import TenantSpend
from calmrun.errors import (
    CalmrunError,
    DecodeError,
    LimitExceededError,
    PoisonStormError,
    UnknownWorkflowError,
    WorkerError,
)
from calmrun.gctune import settle_heap
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams.dlq import MAX_KEY_BYTES, DlqRecord
from calmrun.streams.fetch import getmany
from calmrun.streams.offsets import OffsetTracker
from calmrun.streams.records import (
    IDEMPOTENCY_KEY,
    MOVED_FROM,
    Out,
    StateOut,
    dlq_out,
    event_out,
    header,
    task_out,
)
from calmrun.streams.requests import parse_request
from calmrun.streams.runtable import RunTable
from calmrun.streams.topics import INVALID, Topics, ensure_topics, partition_for, read_to_end
from calmrun.streams.txn import FENCED, Gate, PartitionWriter, transactional_id
from calmrun.workflow.decider import Decision, awaits, decide
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

_TXN_RETRY_BACKOFF_MS = 5


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Running:
    """A task executing here, and the records of it (its own, a re-issued copy) that finish with it."""

    partition: int
    task: asyncio.Task[None] | None = None
    eager: bool = False
    record_seen: bool = False
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
class _Held:
    """A revoked partition's runs, kept in case the rebalance gives it back unchanged."""

    table: RunTable
    state_end: int


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
    peak_unacked: int = 0  # decisions submitted but not yet committed, at most (see max_unacked)
    restored_runs: int = 0
    restored_partitions: int = 0
    kept_partitions: int = 0  # partitions given back by a rebalance with their runs still in memory
    fenced: int = 0  # partitions lost because another worker took them over (their writes were refused)
    transactions: int = 0


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
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.workflows = {wf.name: check_workflow(wf, settings) for wf in workflows}
        self.agents, self.models, self.clock = agents, models, clock
        self.topics = Topics(settings.kafka.prefix)
        self.codec = RecordCodec(wire_models())
        self.stats = WorkerStats()
        self.metrics = metrics
        self.pricing = Pricing.from_settings(settings)
        self.redactor = Redactor(settings.redact)
        # tenant budgets need each tenant's spend in its window, from the cost aggregator's output
        self.tenant_spend = TenantSpend(settings) if settings.budgets.tenants else None
        self.n = settings.kafka.partitions
        self.runs: dict[int, RunTable] = {}
        self.owned: set[int] = set()
        self._offsets = OffsetTracker()
        self._writers: dict[int, PartitionWriter] = {}
        self._held: dict[int, _Held] = {}
        self._gate = Gate(settings.worker.max_unacked)
        self._running: dict[str, _Running] = {}  # idempotency key -> a task executing here
        self._settled: dict[str, int] = {}  # idempotency key -> partition: eager, decided, record unread
        self._slots = asyncio.Semaphore(settings.worker.max_in_flight)
        self._room = asyncio.Event()
        self._room.set()
        self._stable = asyncio.Event()  # cleared while a rebalance is under way: no decisions then
        self._stable.set()
        self._rebalancing = False
        self._rebalance = asyncio.Lock()
        self._timers: list[tuple[int, int, str]] = []
        self._tick = 0.0  # loop time the watchdog last ran: a long gap means this process was paused
        self._loops: list[asyncio.Task[None]] = []
        self._failed: BaseException | None = None
        self._stopped = asyncio.Event()  # set by stop() or by a failure: run_until_stopped() returns
        self._closing = False  # stop() has run (or is running)
        self._consumer: AIOKafkaConsumer | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self._unexpected_in_row = 0  # records in a row whose handling raised (see _isolated)

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
        k, w = self.settings.kafka, self.settings.worker
        await ensure_topics(k, self.workflows.values())
        # "earliest": with the default "latest", the reset that assign() starts in the background can land
        # after our explicit seek and silently skip the whole state partition
        self._restorer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            client_id=f"{k.client_id}-restore",
            **client_kwargs(k),
        )
        session_ms = round(w.session_timeout_s * 1000)
        self._consumer = AIOKafkaConsumer(
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
            await self._restorer.start()
            topics = [self.topics.requests, *self.topics.step_topics(self.workflows.values())]
            self._consumer.subscribe(topics=topics, listener=_Listener(self))
            await self._consumer.start()
        except (KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:  # an ACL, TLS/SASL, or no broker
            await self._close_clients()
            raise (await start_error(k, exc)) from exc
        if self.metrics is not None:
            await self.metrics.start(self)
        if self.tenant_spend is not None:
            await self.tenant_spend.start()
        self._loops = [
            asyncio.create_task(self._poll_loop(), name="calmrun-poll"),
            asyncio.create_task(self._timer_loop(), name="calmrun-timer"),
            asyncio.create_task(self._commit_loop(), name="calmrun-commit"),
            asyncio.create_task(self._watch_loop(), name="calmrun-watch"),
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
        await self._cancel_tasks(set(range(self.n)))
        writers = list(self._writers.values())
        if self._failed is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(wr.flush() for wr in writers)), 30)
        self.owned.clear()
        self._writers.clear()
        await asyncio.gather(*(wr.close() for wr in writers))
        if self.metrics is not None:
            await self.metrics.stop()
        if self.tenant_spend is not None:
            await self.tenant_spend.stop()
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._restorer):
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
            WorkerError: a transaction failed for a reason other than fencing; nothing after the last
                commit is lost, it is re-delivered.
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

    # -- partitions ---------------------------------------------------------------------------------

    def _input_tps(self, p: int) -> list[TopicPartition]:
        topics = [self.topics.requests, *self.topics.step_topics(self.workflows.values())]
        return [TopicPartition(t, p) for t in topics]

    async def _on_revoked(self, parts: set[int]) -> None:
        """Commit what is decided for ``parts``, stop deciding; keep their runs until the next assignment."""
        self._stable.clear()
        self._rebalancing = True
        async with self._rebalance:
            assert self._restorer is not None
            writers = {p: self._writers.pop(p) for p in parts if p in self._writers}
            self.owned -= parts
            await asyncio.gather(*(wr.flush() for wr in writers.values()))
            healthy = [p for p, wr in writers.items() if wr.failed is None and p in self.runs]
            if healthy:
                tps = {p: TopicPartition(self.topics.state, p) for p in healthy}
                ends = await self._restorer.end_offsets(list(tps.values()))
                for p in healthy:
                    self._held[p] = _Held(self.runs.pop(p), ends[tps[p]])
            for p in parts - set(healthy):
                self._discard(p)
            await asyncio.gather(*(wr.close() for wr in writers.values()))
            self._offsets.forget(parts)
            self._timers = [t for t in self._timers if t[1] not in parts]
            heapq.heapify(self._timers)

    async def _on_assigned(self, parts: set[int]) -> None:
        """Take ``parts`` over: fence their previous owner, restore the runs not held, resume fetching."""
        # aiokafka applies the assignment before it awaits this callback, so fetching may already run:
        # records of a partition not yet owned are rewound by the poll loop
        async with self._rebalance:
            assert self._consumer is not None and self._restorer is not None
            for p in set(self._held) - parts:
                self._held.pop(p)
                await self._cancel_tasks({p})
                self._discard(p)
            new = parts - self.owned
            self._consumer.pause(*[tp for p in new for tp in self._input_tps(p)])
            writers = {p: self._writer(p) for p in new}
            await asyncio.gather(*(wr.start() for wr in writers.values()))
            self._writers.update(writers)  # a state record the restore parks is written by its partition's
            state_tps = {p: TopicPartition(self.topics.state, p) for p in new}
            ends = await self._restorer.end_offsets(list(state_tps.values())) if new else {}
            restore: set[int] = set()
            for p in new:
                held = self._held.pop(p, None)
                if held is not None and held.state_end == ends[state_tps[p]]:
                    self.runs[p] = held.table
                    self.stats.kept_partitions += 1
                else:
                    if held is not None:
                        await self._cancel_tasks({p})
                        self._discard(p)
                    restore.add(p)
            if restore:
                await self._restore(restore)
            for p in new:
                # the committed offsets as of now: the previous owner's last transaction is settled
                found: dict[TopicPartition, int] = {}
                for tp in self._input_tps(p):
                    committed = await self._consumer.committed(tp)
                    if committed is not None:
                        self._consumer.seek(tp, committed)
                    else:
                        await self._consumer.seek_to_beginning(tp)
                    found[tp] = committed or 0  # 0: nothing committed, the beginning skips nothing
                writers[p].remember(found)
                for run_id, state in self.runs[p].live():
                    due = state.next_due_ms()
                    if due is not None:
                        heapq.heappush(self._timers, (due, p, run_id))
            self.owned |= new
            self._consumer.resume(*[tp for p in new for tp in self._input_tps(p)])
            self._tick = asyncio.get_running_loop().time()
        self._rebalancing = False
        self._stable.set()
        log.info(
            "partitions assigned: %s (restored %s, kept %s; %d runs restored so far)",
            sorted(parts),
            sorted(restore),
            sorted(new - restore),
            self.stats.restored_runs,
        )

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
            # a transaction begun right after a commit meets the broker still writing the last one's
            # markers (CONCURRENT_TRANSACTIONS; NOT_ENOUGH_REPLICAS to a client of aiokafka's protocol
            # version) and is retried after this; aiokafka's 100 ms default doubled every commit cycle
            # (31 -> 14 ms median with 10 ms, measured on the dev broker)
            retry_backoff_ms=_TXN_RETRY_BACKOFF_MS,
            max_request_size=k.max_request_size,
            **client_kwargs(k),
        )

        def committed(positions: dict[TopicPartition, int]) -> None:
            self._offsets.committed(positions)
            self.stats.transactions += 1

        def positions(part: int) -> dict[TopicPartition, int]:
            return {tp: off for tp, off in self._offsets.to_commit().items() if tp.partition == part}

        return PartitionWriter(
            p, producer, self.settings.group_id, positions, committed, self._gate, self._lost
        )

    def _lost(self, p: int, exc: BaseException) -> None:
        """A transaction of ``p`` failed: fenced means another worker owns it now; anything else stops us."""
        if not isinstance(exc, FENCED):
            self._fail(exc)
            return
        self.stats.fenced += 1
        log.warning("partition %d was taken over by another worker (%r): dropping its runs", p, exc)
        self.owned.discard(p)
        writer = self._writers.pop(p, None)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.pause(*self._input_tps(p))
        for r in self._running.values():
            if r.partition == p and r.task is not None:
                r.task.cancel()
        self._discard(p)
        if writer is not None:
            asyncio.get_running_loop().create_task(writer.close())

    def _discard(self, p: int) -> None:
        """Forget everything about partition ``p`` (its tasks must be cancelled already)."""
        self.runs.pop(p, None)
        self._held.pop(p, None)
        self._offsets.forget({p})
        self._settled = {k: q for k, q in self._settled.items() if q != p}
        self._timers = [t for t in self._timers if t[1] != p]
        heapq.heapify(self._timers)

    async def _restore(self, parts: set[int]) -> None:
        """Rebuild the run table of ``parts`` from the compacted state topic, up to its end offset."""
        assert self._restorer is not None
        tps = [TopicPartition(self.topics.state, p) for p in parts]
        for p in parts:
            self.runs[p] = RunTable(self.codec)
        async for rec in read_to_end(self._restorer, tps):
            table = self.runs[rec.partition]
            run_id = (rec.key or b"").decode(errors="replace")
            if rec.value is None:
                table.pop(run_id)
                continue
            try:
                table.put(run_id, self.codec.decode_as(rec.value, RunState), rec.value)
            except DecodeError as exc:  # not written by a worker: park it, restore the rest
                self._poison(TopicPartition(rec.topic, rec.partition), rec, exc, None, finish=False)
        self._restorer.unsubscribe()
        for p in parts:
            self.stats.restored_runs += len(self.runs[p])
            self.stats.restored_partitions += 1

    async def _cancel_tasks(self, parts: set[int]) -> None:
        doomed = [r.task for r in self._running.values() if r.partition in parts and r.task is not None]
        for t in doomed:
            t.cancel()
        for t in doomed:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- the loops ----------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        assert self._consumer is not None
        limit = self.settings.worker.max_in_flight
        try:
            while True:
                while len(self._running) >= limit:
                    self._room.clear()
                    await self._room.wait()
                # decisions outrun the commits when agents return at once: fetch no more until they catch up
                await self._gate.room()
                fetched = await getmany(
                    self._consumer,
                    timeout_ms=200,
                    max_records=max(limit, 500),
                    consumed_to=self._offsets.consumed_to,
                )
                batch = fetched.records
                await self._revalidate_if_stalled()  # before a paused worker starts any task it read
                for tp, records in batch.items():
                    if tp.partition not in self.owned:
                        # fetched before this partition was taken over here: read it again later
                        self._consumer.seek(tp, records[0].offset)
                        continue
                    for rec in records:
                        if tp.partition not in self.owned:  # lost to a fence meanwhile
                            break
                        self._offsets.consumed(tp, rec.offset)
                        if rec.topic == self.topics.requests:
                            self._on_request(tp, rec)
                        else:
                            self._on_task(tp, rec)
                for tp, offset, exc in fetched.unreadable:
                    self._unparsable(tp, offset, exc)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _timer_loop(self) -> None:
        interval = self.settings.worker.timer_interval_s
        try:
            while True:
                await asyncio.sleep(interval)
                if self._stable.is_set():
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
                f"{run_id}/{name}/{kind}/{st.attempt}" in self._running
                for name, st in state.steps.items()
                for kind in ("run", "compensate")
                if st.deadline_ms is not None and st.deadline_ms <= now
            ):
                # still running here (started late behind a backlog): its own timeout will end it
                heapq.heappush(self._timers, (now + 1000, p, run_id))
                continue
            self._decide(p, self.workflows[state.workflow], state, TimerFired(run_id, now), None, ())

    async def _watch_loop(self) -> None:
        """Notice that this process was paused (SIGSTOP, a VM freeze) or its loop blocked for long."""
        loop = asyncio.get_running_loop()
        self._tick = loop.time()
        try:
            while True:
                await asyncio.sleep(0.1)
                await self._revalidate_if_stalled()
                self._tick = loop.time()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _revalidate_if_stalled(self) -> None:
        """After a stall of half a session or more, prove each partition is still ours before going on.

        Another worker may have been given our partitions meanwhile. Its initialisation fences our
        transactions, so nothing we decide can count; but a task read from a step topic would start an
        agent whose result the other worker may have recorded already. So: stop deciding, commit a probe
        transaction per partition (a fenced one fails and the partition is dropped), then go on.
        """
        loop = asyncio.get_running_loop()
        gap = loop.time() - self._tick
        if gap < self.settings.worker.session_timeout_s / 2:
            return
        self._stable.clear()
        try:
            async with self._rebalance:
                if loop.time() - self._tick < self.settings.worker.session_timeout_s / 2:
                    return  # checked by the other caller meanwhile
                log.warning(
                    "this worker was stalled for %.1fs: checking its partitions are still its own", gap
                )
                writers = list(self._writers.values())
                await asyncio.gather(*(wr.probe() for wr in writers))
                self._tick = loop.time()
        finally:
            if not self._rebalancing:
                self._stable.set()

    async def _commit_loop(self) -> None:
        """Commit input offsets that moved without a decision (task records finished by an earlier one)."""
        try:
            while True:
                await asyncio.sleep(self.settings.worker.commit_interval_s)
                for wr in list(self._writers.values()):
                    wr.kick()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    # -- records ------------------------------------------------------------------------------------

    def _finisher(self, tp: TopicPartition, offset: int) -> Callable[[], None]:
        return functools.partial(self._offsets.finished, tp, offset)

    def _isolated(
        self,
        handle: Callable[[TopicPartition, ConsumerRecord[bytes, bytes]], None],
        tp: TopicPartition,
        rec: ConsumerRecord[bytes, bytes],
    ) -> None:
        """Handle one record; whatever it raises parks that record as poison and finishes it.

        One record never stops the worker. Only ``limits.max_consecutive_poison`` records in a row (on all
        partitions) whose handling raised an unexpected error do: that is a bug of ours, not bad input.
        """
        try:
            handle(tp, rec)
        # Broad on purpose: the record is parked with the cause and its offset committed past it.
        except Exception as exc:
            if not isinstance(exc, CalmrunError):
                self._unexpected_in_row += 1
            self._poison(tp, rec, exc, None)
            if self._unexpected_in_row >= self.settings.limits.max_consecutive_poison:
                self._fail(PoisonStormError(self._unexpected_in_row, type(exc).__name__))
        else:
            self._unexpected_in_row = 0

    def _on_request(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        self._isolated(self._handle_request, tp, rec)

    def _handle_request(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        self.stats.requests += 1
        fallback = f"{rec.topic}-{rec.partition}-{rec.offset}"
        try:
            run_id, body = parse_request(
                rec.key,
                rec.value,
                self.codec,
                fallback_id=fallback,
                limits=self.settings.limits,
                headers=rec.headers,
            )
        except DecodeError as exc:
            self._poison(tp, rec, exc, None)
            return
        p = partition_for(run_id, self.n)
        if p != rec.partition:
            # produced by a client with another partitioner (kcat's default, or no key): move it to the
            # partition that owns this run, keyed by the run ID
            moved = (*rec.headers, (MOVED_FROM, f"{rec.partition}:{rec.offset}".encode()))
            out = Out(rec.topic, p, run_id.encode(), rec.value, moved)
            self._submit(rec.partition, [out], None, (self._finisher(tp, rec.offset),), None)
            return
        wf_name = body.workflow
        wf = self.workflows.get(wf_name)
        if wf is None:
            self._poison(tp, rec, UnknownWorkflowError(wf_name, list(self.workflows)), None)
            return
        state = self.runs[p].get(run_id)
        inp: DeciderInput
        if isinstance(body, RunCommand):
            attempts = sum(st.attempt for st in state.steps.values()) if state else 0
            if attempts >= self.settings.limits.max_attempts_per_run:
                limit = self.settings.limits.max_attempts_per_run
                over = LimitExceededError(  # the next attempt would be one too many
                    "max_attempts_per_run", actual=attempts + 1, maximum=limit, what="redrive"
                )
                self._poison(tp, rec, over, wf_name)
                return
            inp = RedriveRequested(run_id, rec.timestamp, body.by)
        else:
            inp = self._request(run_id, wf, body, rec.timestamp)
        self._decide(p, wf, state, inp, rec, (self._finisher(tp, rec.offset),))

    def _request(self, run_id: str, wf: WorkflowDef, body: RunRequest, at_ms: int) -> RunRequested:
        """The decider's input for a request, stamped with the tenant's spend when it has a budget."""
        budget = self.settings.budgets.tenants.get(body.tenant)
        if (
            budget is None
            or self.tenant_spend is None
            or run_id in self.runs.get(partition_for(run_id, self.n), ())
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

    def _on_task(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        self._isolated(self._handle_task, tp, rec)

    def _handle_task(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        finish = self._finisher(tp, rec.offset)
        idem_bytes = header(rec.headers, IDEMPOTENCY_KEY)
        idem = idem_bytes.decode(errors="replace") if idem_bytes is not None else None
        if idem is not None and self._echo(idem, rec.partition, finish):
            return
        try:
            task = self.codec.decode_as(rec.value or b"", StepTask)
        except DecodeError as exc:
            self._poison(tp, rec, exc, None)
            return
        if task.idempotency_key != idem and self._echo(task.idempotency_key, rec.partition, finish):
            return
        p = rec.partition
        state = self._state(p, task.run_id)
        if state is None or not awaits(state, task.step, task.attempt, task.kind):
            self.stats.tasks_skipped += 1
            st = state.steps.get(task.step) if state else None
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
            self._submit(p, [self._event_out(p, ev)], None, (finish,), [ev])
            return
        self._start(p, task, rec, eager=False, finishers=[finish])

    def _echo(self, idem: str, p: int, finish: Callable[[], None]) -> bool:
        """Is this record a task running or decided here? Then it finishes with that task's result."""
        running = self._running.get(idem)
        if running is not None and running.partition == p:
            self.stats.tasks_echoed += running.eager and not running.record_seen
            running.record_seen = True
            running.finishers.append(finish)
            return True
        if self._settled.get(idem) == p:  # an eager task whose result is committed already
            del self._settled[idem]
            self.stats.tasks_echoed += 1
            finish()
            return True
        return False

    def _start(
        self,
        p: int,
        task: StepTask,
        source: ConsumerRecord[bytes, bytes] | _LocalSource,
        *,
        eager: bool,
        finishers: list[Callable[[], None]],
    ) -> None:
        idem = task.idempotency_key
        if idem in self._running:
            return
        self.stats.tasks_started += 1
        self.stats.tasks_eager += eager
        running = self._running[idem] = _Running(p, eager=eager, record_seen=not eager, finishers=finishers)
        running.task = asyncio.create_task(self._run_task(p, source, task, idem))

    def _start_committed(self, p: int, tasks: list[tuple[Out, StepTask]]) -> None:
        """Start the tasks of a decision just committed (eager execution; see the module docstring)."""
        if p not in self.owned or self._stopped.is_set():
            return
        for out, task in tasks:
            state = self._state(p, task.run_id)
            if state is None or not awaits(state, task.step, task.attempt, task.kind):
                continue  # its record was read back first and the attempt has run already
            source = _LocalSource(out.topic, p, out.key or b"", out.value or b"", out.headers)
            self._start(p, task, source, eager=True, finishers=[])

    async def _run_task(
        self, p: int, source: ConsumerRecord[bytes, bytes] | _LocalSource, task: StepTask, idem: str
    ) -> None:
        try:
            async with self._slots:
                # queued behind the slots: check again, as a pause may have handed the partition over
                await self._revalidate_if_stalled()
                await self._stable.wait()
                state = self._state(p, task.run_id)
                if (
                    p not in self.owned
                    or state is None
                    or not awaits(state, task.step, task.attempt, task.kind)
                ):
                    running = self._running.pop(idem)
                    if p in self.owned:  # decided meanwhile (a copy of the task ran): its records are done
                        for finish in running.finishers:
                            finish()
                    return
                self.stats.running += 1
                self.stats.peak_running = max(self.stats.peak_running, self.stats.running)
                try:
                    scrub = functools.partial(self.redactor.text, state=self._state(p, task.run_id))
                    result = await execute(
                        task,
                        self.agents,
                        self.models,
                        now_ms=self.clock,
                        pricing=self.pricing,
                        scrub=scrub,
                        limits=self.settings.limits,
                    )
                finally:
                    self.stats.running -= 1
            await self._stable.wait()  # a rebalance decides whether this partition is still ours
            if p not in self.owned or self._stopped.is_set():
                log.info("dropping result of %s: partition %d no longer owned", idem, p)
                return
            running = self._running.pop(idem)
            if running.eager and not running.record_seen:
                self._settled[idem] = p
            state = self._state(p, task.run_id)
            self._decide(p, self.workflows[task.workflow], state, result, source, running.finishers)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._running.pop(idem, None)
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
        finishers: Sequence[Callable[[], None]],
    ) -> Decision:
        d = decide(wf, state, inp)
        self.stats.decisions += 1
        run_id = inp.run_id
        key = run_id.encode()
        outputs = [self._event_out(p, ev) for ev in d.events]
        if d.ignored:
            self.stats.ignored += 1
            self._submit(p, outputs, None, finishers, d.events)
            return d
        assert d.state is not None
        encoded = self.runs[p].put(run_id, d.state)  # a finished run is encoded now, and kept so
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
            outputs.append(self._dlq_out(self.topics.dlq(wf.name), p, key, dlq))
        encode = functools.partial(self.codec.encode, d.state) if encoded is None else lambda: encoded
        state_out = StateOut(self.topics.state, p, key, encode)
        eager = tasks if self.settings.worker.eager else []
        self._submit(p, outputs, state_out, finishers, d.events, eager, quarantined=d.quarantine is not None)
        due = d.state.next_due_ms()
        if due is not None:
            heapq.heappush(self._timers, (due, p, run_id))
        return d

    def _poison(
        self,
        tp: TopicPartition,
        rec: ConsumerRecord[bytes, bytes],
        exc: Exception,
        workflow: str | None,
        *,
        finish: bool = True,
    ) -> None:
        """Park a record that cannot be processed at all; the processor goes on with the next one."""
        self.stats.poison += 1
        why = self.redactor.text(str(exc))
        log.warning("poison record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, why)
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
            headers={k: v or b"" for k, v in rec.headers},  # a header's value may be null
            at_ms=self.clock(),
        )
        out = self._dlq_out(self.topics.dlq(workflow or INVALID), rec.partition, rec.key, dlq)
        self._submit(rec.partition, [out], None, (self._finisher(tp, rec.offset),) if finish else (), ())

    def _unparsable(self, tp: TopicPartition, offset: int, exc: Exception) -> None:
        """Park a record the Kafka client could not even parse (see ``streams.fetch``): no bytes to keep."""
        if tp.partition not in self.owned:
            assert self._consumer is not None
            self._consumer.seek(tp, offset)  # as for any record fetched before its partition was restored
            return
        rec: ConsumerRecord[bytes, bytes] = ConsumerRecord(
            tp.topic, tp.partition, offset, -1, 0, None, None, None, -1, -1, ()
        )
        self._offsets.consumed(tp, offset)
        why = DecodeError(f"the Kafka client cannot parse this record (a header name not UTF-8?): {exc!r}")
        self._poison(tp, rec, why, None)

    def _event_out(self, p: int, ev: RunEvent) -> Out:
        ev = self.redactor.event(ev, self._state(p, ev.run_id))  # settings.redact (calmrun.redact)
        return event_out(self.topics, self.codec, p, ev)

    def _dlq_out(self, topic: str, p: int, key: bytes | None, dlq: DlqRecord) -> Out:
        state = self._state(p, dlq.run_id) if dlq.run_id else None
        dlq = self.redactor.dlq(dlq, state, self.codec)  # settings.redact (calmrun.redact)
        # a dead letter always fits its topic, and always encodes (see DlqRecord.fitted)
        dlq = dlq.fitted(self.settings.limits.dlq_max_payload_bytes)
        key = key if key is None or len(key) <= MAX_KEY_BYTES else key[:MAX_KEY_BYTES]
        try:
            return dlq_out(topic, self.codec, p, key, dlq)
        except CalmrunError as exc:
            dlq = dlq.model_copy(update={"key": None, "value": None, "headers": {}, "error": f"{exc}"})
            return dlq_out(topic, self.codec, p, key, dlq.fitted(0))

    def _submit(
        self,
        p: int,
        outputs: list[Out],
        state: StateOut | None,
        finishers: Sequence[Callable[[], None]],
        events: Sequence[RunEvent] | None,
        eager: list[tuple[Out, StepTask]] | None = None,
        *,
        quarantined: bool = False,
    ) -> None:
        """Add one decision to partition ``p``'s next transaction; its inputs are finished with it."""
        writer = self._writers[p]
        for finish in finishers:
            finish()

        def on_commit() -> None:
            if events:
                for ev in events:
                    if ev.type == "run.completed":
                        self.stats.completed += 1
                    if self.metrics is not None:
                        self.metrics.observe(ev)
            self.stats.quarantined += quarantined
            if eager:
                self._start_committed(p, eager)

        writer.add(outputs, state, on_commit)
        self.stats.peak_unacked = max(self.stats.peak_unacked, self._gate.peak)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker._on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker._on_assigned({tp.partition for tp in assigned})

"""Which partitions this worker owns, and their runs: rebalances, restore, fencing, stalls.

A partition is owned once its transactional writer is initialised (which fences the previous owner), its
runs are in memory, and its input positions are the committed offsets. A rebalance restores only what is
new: a revoked partition's runs are held, and reused when the same partition comes back with the state
topic's end offset unchanged. A writer refused by the broker (``ProducerFenced``) means another worker
owns the partition now: it is dropped here and rejoins with the group. After a stall of half a session
(a paused process), a probe transaction per partition proves ownership before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from calmrun.errors import DecodeError, WriterBrokenError
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.runtable import RunTable
from calmrun.streams.runtime import Listener
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.timers import Timers
from calmrun.streams.txn import FENCED, PartitionWriter
from calmrun.wire.codec import RecordCodec
from calmrun.workflow.decider import awaits
from calmrun.workflow.events import StepTask
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")

RETAKES, RETAKE_WINDOW_S = 3, 60.0
"""A partition whose producer broke is taken over again at most this often in this window, then we stop."""


@dataclass
class _Held:
    table: RunTable
    state_end: int


@dataclass
class PartitionCounts:
    restored_runs: int = 0
    restored_partitions: int = 0
    kept_partitions: int = 0  # given back by a rebalance with their runs still in memory
    fenced: int = 0  # lost because another worker took them over (its writes were refused)
    retaken: int = 0  # taken over again by this worker because their producer broke (WriterBrokenError)


class Partitions:
    """The owned partitions of one worker; see the module docstring.

    Args:
        input_topics: the topics the worker consumes (requests, its step topics).
        writer: makes the transactional writer of a partition (not started).
        park: parks an undecodable state record (``Worker._poison`` without finishing an input).
        on_failed: a writer failed for another reason than fencing: the worker must stop.
    """

    def __init__(
        self,
        topics: Topics,
        codec: RecordCodec,
        input_topics: list[str],
        checkpoint: Checkpoint,
        timers: Timers,
        tasks: TaskRunner,
        writer: Callable[[int], PartitionWriter],
        park: Callable[[TopicPartition, ConsumerRecord[bytes, bytes], Exception], None],
        on_failed: Callable[[BaseException], None],
        session_timeout_s: float,
    ) -> None:
        self.topics, self.codec, self._inputs = topics, codec, input_topics
        self._checkpoint, self._timers, self._tasks = checkpoint, timers, tasks
        self._make_writer, self._park, self._on_failed = writer, park, on_failed
        self._stall_s = session_timeout_s / 2
        self.owned: set[int] = set()
        self.runs: dict[int, RunTable] = {}
        self.writers: dict[int, PartitionWriter] = {}
        self._held: dict[int, _Held] = {}
        self.counts = PartitionCounts()
        self.consumer: AIOKafkaConsumer | None = None
        self.restorer: AIOKafkaConsumer | None = None
        self.stable = asyncio.Event()  # cleared while ownership is in question: no decisions then
        self.stable.set()
        self._rebalancing = False
        self._lock = asyncio.Lock()
        self._retakes: dict[int, list[float]] = {}  # partition -> monotonic times it was taken over again
        self.tick = 0.0  # loop time the watchdog last ran: a long gap means this process was paused
        self.on_assigned: Callable[[], None] = lambda: None  # after each assignment (streams.versions)
        self.on_taken: Callable[[set[int]], None] = lambda parts: None  # partitions newly owned (resume)
        self.assigned_once = asyncio.Event()  # the group gave this worker its partitions, all restored
        self.restoring: set[int] = set()  # being taken over now (fenced, restored, positioned)

    def input_tps(self, p: int) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in self._inputs]

    def state(self, p: int, run_id: str) -> RunState | None:
        table = self.runs.get(p)
        return table.get(run_id) if table is not None else None

    def listener(self) -> ConsumerRebalanceListener:
        """The group consumer's rebalance callbacks (``consumer`` set first), to this owner."""
        assert self.consumer is not None
        return Listener(self, self.consumer)

    def awaited(self, p: int, task: StepTask) -> bool:
        """Does the run's state (here) still wait for this attempt?"""
        state = self.state(p, task.run_id)
        return state is not None and awaits(state, task.step, task.attempt, task.kind, task.element)

    async def admit(self, p: int, task: StepTask) -> bool:
        """May ``task`` start now? Asked after it waited for a slot: a pause may have moved ``p``."""
        await self.revalidate_if_stalled()
        return await self.accept(p) and self.awaited(p, task)

    async def accept(self, p: int) -> bool:
        """Wait out a rebalance or a stall check; then: is ``p`` ours to decide?"""
        await self.stable.wait()
        return p in self.owned

    # -- rebalances ---------------------------------------------------------------------------------

    async def revoked(self, parts: set[int]) -> None:
        """Commit what is decided for ``parts``, stop deciding; hold their runs for the next assignment."""
        self.stable.clear()
        self._rebalancing = True
        async with self._lock:
            assert self.restorer is not None
            writers = {p: self.writers.pop(p) for p in parts if p in self.writers}
            self.owned -= parts
            await asyncio.gather(*(wr.flush() for wr in writers.values()))
            healthy = [p for p, wr in writers.items() if wr.failed is None and p in self.runs]
            if healthy:
                tps = {p: TopicPartition(self.topics.state, p) for p in healthy}
                ends = await self.restorer.end_offsets(list(tps.values()))
                for p in healthy:
                    self._held[p] = _Held(self.runs.pop(p), ends[tps[p]])
            for p in parts - set(healthy):
                self.discard(p)
            await asyncio.gather(*(wr.close() for wr in writers.values()))
            self._checkpoint.forget(parts)
            self._timers.drop(parts)

    async def assigned(self, parts: set[int], *, retake: bool = False) -> None:
        """Take ``parts`` over: fence their previous owner, restore the runs not held, resume fetching.

        ``retake``: not a rebalance but a partition this worker owns whose producer broke (``lost``); it
        is skipped when a rebalance began meanwhile or the group no longer gives us ``parts``."""
        # aiokafka applies the assignment before it awaits this callback, so fetching may already run:
        # records of a partition not yet owned are rewound by the intake
        async with self._lock:
            assert self.consumer is not None and self.restorer is not None
            if retake and (self._rebalancing or not self._assigned_to_us(parts)):
                return
            for p in set(self._held) - parts:
                self._held.pop(p)
                await self._tasks.cancel({p})
                self.discard(p)
            new = self.restoring = parts - self.owned
            self.consumer.pause(*[tp for p in new for tp in self.input_tps(p)])
            writers = {p: self._make_writer(p) for p in new}
            await asyncio.gather(*(wr.start() for wr in writers.values()))
            self.writers.update(writers)  # a state record the restore parks is written by its partition's
            state_tps = {p: TopicPartition(self.topics.state, p) for p in new}
            ends = await self.restorer.end_offsets(list(state_tps.values())) if new else {}
            restore: set[int] = set()
            for p in new:
                held = self._held.pop(p, None)
                if held is not None and held.state_end == ends[state_tps[p]]:
                    self.runs[p] = held.table
                    self.counts.kept_partitions += 1
                else:
                    if held is not None:
                        await self._tasks.cancel({p})
                        self.discard(p)
                    restore.add(p)
            if restore:
                await self._restore(restore)
            for p in new:
                await self._seek_committed(p)
                for run_id, state in self.runs[p].live():
                    due = state.next_due_ms()
                    if due is not None:
                        self._timers.push(due, p, run_id)
            self.owned |= new
            self.restoring = set()
            self.assigned_once.set()
            self.consumer.resume(*[tp for p in new for tp in self.input_tps(p)])
            self.tick = asyncio.get_running_loop().time()
        self._rebalancing = False
        self.stable.set()
        self.on_assigned()
        self.on_taken(new)
        log.info(
            "partitions assigned: %s (restored %s, kept %s; %d runs restored so far)",
            sorted(parts),
            sorted(restore),
            sorted(new - restore),
            self.counts.restored_runs,
        )

    async def _seek_committed(self, p: int) -> None:
        """Position ``p``'s inputs at the committed offsets as of now (the last owner's are settled), and
        tell the checkpoint (a probe transaction commits them again)."""
        assert self.consumer is not None
        found: dict[TopicPartition, int] = {}
        for tp in self.input_tps(p):
            committed = await self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)
            else:
                await self.consumer.seek_to_beginning(tp)
            found[tp] = committed or 0  # 0: nothing committed, the beginning skips nothing
        self._checkpoint.positioned(found)

    async def _restore(self, parts: set[int]) -> None:
        """Rebuild the run table of ``parts`` from the compacted state topic, up to its end offset."""
        assert self.restorer is not None
        tps = [TopicPartition(self.topics.state, p) for p in parts]
        for p in parts:
            self.runs[p] = RunTable(self.codec)
        async for rec in read_to_end(self.restorer, tps):
            table = self.runs[rec.partition]
            run_id = (rec.key or b"").decode(errors="replace")
            if rec.value is None:
                table.pop(run_id)
                continue
            try:
                table.put(run_id, self.codec.decode_as(rec.value, RunState), rec.value)
            except DecodeError as exc:  # not written by a worker: park it, restore the rest
                self._park(TopicPartition(rec.topic, rec.partition), rec, exc)
        self.restorer.unsubscribe()
        for p in parts:
            self.counts.restored_runs += len(self.runs[p])
            self.counts.restored_partitions += 1

    def discard(self, p: int) -> None:
        """Forget everything about partition ``p`` (its tasks are cancelled already)."""
        self.runs.pop(p, None)
        self._held.pop(p, None)
        self._checkpoint.forget({p})
        self._tasks.forget(p)
        self._timers.drop({p})

    def lost(self, p: int, exc: BaseException) -> None:
        """A transaction of ``p`` failed: fenced means another worker owns it now; a broken producer is
        replaced (``p`` is taken over again, as on an assignment); anything else stops us."""
        if isinstance(exc, WriterBrokenError) and self._may_retake(p):
            log.warning("%s: taking partition %d over again with a new producer", exc, p)
            writer = self._drop(p)
            asyncio.get_running_loop().create_task(self._retake(p, writer))
            return
        if not isinstance(exc, FENCED):
            self._on_failed(exc)
            return
        self.counts.fenced += 1
        log.warning("partition %d was taken over by another worker (%r): dropping its runs", p, exc)
        writer = self._drop(p)
        if writer is not None:
            asyncio.get_running_loop().create_task(writer.close())

    def _drop(self, p: int) -> PartitionWriter | None:
        """Stop deciding ``p`` and forget its runs; returns its writer, to close."""
        self.owned.discard(p)
        writer = self.writers.pop(p, None)
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.pause(*self.input_tps(p))
        self._tasks.cancel_now(p)
        self.discard(p)
        return writer

    def _may_retake(self, p: int) -> bool:
        """At most ``RETAKES`` per partition in ``RETAKE_WINDOW_S``; past that the worker stops instead."""
        now = time.monotonic()
        recent = self._retakes[p] = [t for t in self._retakes.get(p, []) if now - t < RETAKE_WINDOW_S]
        if len(recent) >= RETAKES:
            return False
        recent.append(now)
        return True

    async def _retake(self, p: int, writer: PartitionWriter | None) -> None:
        """Take ``p`` over again, as an assignment does: a new producer under the same transactional id
        settles the broken one's open transaction; the runs are restored; the inputs re-read from the
        committed offsets."""
        if writer is not None:
            await writer.close()
        self.counts.retaken += 1
        try:
            await self.assigned({p}, retake=True)
        except Exception as exc:  # the broker is not back yet, or worse: the worker cannot go on
            self._on_failed(exc)

    def _assigned_to_us(self, parts: set[int]) -> bool:
        assert self.consumer is not None
        assignment: set[TopicPartition] = self.consumer.assignment()
        return {tp for p in parts for tp in self.input_tps(p)} <= assignment

    # -- stalls -------------------------------------------------------------------------------------

    async def revalidate_if_stalled(self) -> None:
        """After a stall of half a session or more, prove each partition is still ours before going on.

        Another worker may have been given our partitions meanwhile. Its initialisation fences our
        transactions, so nothing we decide can count; but a task read from a step topic would start an
        agent whose result the other worker may have recorded already. So: stop deciding, commit a probe
        transaction per partition (a fenced one fails and the partition is dropped), then go on.
        """
        loop = asyncio.get_running_loop()
        gap = loop.time() - self.tick
        if gap < self._stall_s:
            return
        self.stable.clear()
        try:
            async with self._lock:
                if loop.time() - self.tick < self._stall_s:
                    return  # checked by another caller meanwhile
                log.warning(
                    "this worker was stalled for %.1fs: checking its partitions are still its own", gap
                )
                await asyncio.gather(*(wr.probe() for wr in list(self.writers.values())))
                self.tick = loop.time()
        finally:
            if not self._rebalancing:
                self.stable.set()

    async def watch(self) -> None:
        """Notice that this process was paused (SIGSTOP, a VM freeze) or its loop blocked for long."""
        loop = asyncio.get_running_loop()
        self.tick = loop.time()
        while True:
            await asyncio.sleep(0.1)
            await self.revalidate_if_stalled()
            self.tick = loop.time()

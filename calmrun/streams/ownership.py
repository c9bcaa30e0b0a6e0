"""What this worker owns now, as every room reads it: partitions, their runs and writers; stalls; admission.

``Ownership`` is the table the rooms read (is ``p`` ours, the run's state, ``p``'s writer); only
``streams.partitions`` (rebalances, fencing) and ``streams.restore`` change it. ``Stalls`` proves ownership
after a pause, and ``Admission`` is what the task runner asks before an agent starts and when its result is
in. They are made first, before the rooms that read them, so no room needs the one that changes ownership.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.kafka.topics import partition_for
from calmrun.streams.membership import Membership
from calmrun.streams.runtable import RunTable
from calmrun.streams.txn import TxnWriter
from calmrun.workflow.decider import awaits
from calmrun.workflow.events import StepTask
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")


@dataclass
class PartitionCounts:
    restored_runs: int = 0
    restored_partitions: int = 0
    kept_partitions: int = 0  # given back by a rebalance with their runs still in memory
    fenced: int = 0  # lost because another worker took them over (its writes were refused)
    retaken: int = 0  # times the writer was replaced because its producer broke (WriterBrokenError)


class Ownership:
    """The owned partitions of one worker, their runs and writers, now; see the module docstring.

    Args:
        members: the worker's group membership: its input topics, the group consumer and the restorer.
    """

    def __init__(self, members: Membership, n: int) -> None:
        self._members, self.input_topics, self.n = members, members.topics, n
        self.owned: set[int] = set()
        self.runs: dict[int, RunTable] = {}
        self.writer: TxnWriter | None = None  # one for every owned partition (``streams.partitions``)
        self.stable = asyncio.Event()  # cleared while ownership is in question: no decisions then
        self.stable.set()
        self.rebalancing = False
        self.lock = asyncio.Lock()  # one change of ownership (or stall check) at a time
        self.assigned_once = asyncio.Event()  # the group gave this worker its partitions, all restored
        self.restoring: set[int] = set()  # being taken over now (fenced, restored, positioned)
        self.counts = PartitionCounts()

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer (None before the worker joins)."""
        return self._members.consumer

    @property
    def restorer(self) -> AIOKafkaConsumer | None:
        """Reads the state topic (``streams.restore``; None before the worker joins)."""
        return self._members.restorer

    def writers(self) -> list[TxnWriter]:
        """The writer of now, if there is one (none between a fence and the next assignment)."""
        return [] if self.writer is None else [self.writer]

    def writer_of(self, p: int) -> TxnWriter:
        """The writer that writes ``p``'s decisions now.

        Raises:
            KeyError: no writer writes for ``p`` (not ours, or lost meanwhile).
        """
        writer = self.writer
        if writer is None or p not in writer.partitions:
            raise KeyError(p)
        return writer

    def input_tps(self, p: int) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in self.input_topics]

    def state(self, p: int, run_id: str) -> RunState | None:
        table = self.runs.get(p)
        return table.get(run_id) if table is not None else None

    def known(self, run_id: str) -> bool:
        """Is ``run_id`` a run of an owned partition, held here?"""
        return run_id in self.runs.get(partition_for(run_id, self.n), ())

    def awaited(self, p: int, task: StepTask) -> bool:
        """Does the run's state (here) still wait for this attempt?"""
        state = self.state(p, task.run_id)
        return state is not None and awaits(state, task.step, task.attempt, task.kind, task.element)

    async def accept(self, p: int) -> bool:
        """Wait out a rebalance or a stall check; then: is ``p`` ours to decide?"""
        if not self.stable.is_set():  # asked twice per attempt: awaited only when ownership is in question
            await self.stable.wait()
        return p in self.owned


class Stalls:
    """Notices a pause of this process and proves each partition is still ours before going on.

    Another worker may have been given our partitions meanwhile. Its initialisation fences our
    transactions, so nothing we decide can count; but a task read from a step topic would start an
    agent whose result the other worker may have recorded already. So: stop deciding, commit a probe
    transaction (fenced, it fails and the partitions are dropped), then go on.
    """

    def __init__(self, ownership: Ownership, session_timeout_s: float) -> None:
        self._own = ownership
        self._stall_s = session_timeout_s / 2
        self.tick = 0.0  # loop time the watchdog last ran: a long gap means this process was paused

    def ran(self) -> None:
        """Ownership was settled just now (an assignment): no stall to check before this."""
        self.tick = asyncio.get_running_loop().time()

    def stalled(self) -> bool:
        """Was this process paused for half a session or more since the watchdog last ran?"""
        return asyncio.get_running_loop().time() - self.tick >= self._stall_s

    async def revalidate_if_stalled(self) -> None:
        """After a stall of half a session or more, prove each partition is still ours (see the class)."""
        own, loop = self._own, asyncio.get_running_loop()
        if not self.stalled():
            return
        gap = loop.time() - self.tick
        own.stable.clear()
        try:
            async with own.lock:
                if not self.stalled():
                    return  # checked by another caller meanwhile
                log.warning(
                    "this worker was stalled for %.1fs: checking its partitions are still its own", gap
                )
                if own.writer is not None:
                    await own.writer.probe()
                self.tick = loop.time()
        finally:
            if not own.rebalancing:
                own.stable.set()

    async def watch(self) -> None:
        """Notice that this process was paused (SIGSTOP, a VM freeze) or its loop blocked for long."""
        loop = asyncio.get_running_loop()
        self.tick = loop.time()
        while True:
            await asyncio.sleep(0.1)
            await self.revalidate_if_stalled()
            self.tick = loop.time()


class Admission:
    """The task runner's ``Admission`` port for a deciding worker: owned, stable, awaited, not stopping.

    Args:
        stopped: set when the worker stops or fails: no result is decided after.
    """

    def __init__(self, ownership: Ownership, stalls: Stalls, stopped: asyncio.Event) -> None:
        self._own, self._stalls, self._stopped = ownership, stalls, stopped

    async def admit(self, p: int, task: StepTask) -> bool:
        """May ``task`` start now? Asked after it waited for a slot: a pause may have moved ``p``."""
        if self._stalls.stalled():  # checked per attempt: a coroutine only when there is a stall to prove
            await self._stalls.revalidate_if_stalled()
        return await self._own.accept(p) and self._own.awaited(p, task)

    async def accept(self, p: int) -> bool:
        return await self._own.accept(p) and not self._stopped.is_set()

"""How this worker's ownership changes: rebalances, the writers of its partitions, fencing, retakes.

A partition is owned once its transactional writer is initialised (which fences the previous owner), its
runs are in memory (``streams.restore``), and its input positions are the committed offsets. A rebalance
restores only what is new: a revoked partition's runs are held, and reused when the same partition comes
back with the state topic's end offset unchanged. A writer refused by the broker (``ProducerFenced``) means
another worker owns the partition now: it is dropped here and rejoins with the group. What is owned now is
``streams.ownership``'s table, which the other rooms read; this room alone changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import TopicPartition

from calmrun.errors import WriterBrokenError
from calmrun.settings import Settings
from calmrun.streams import clients
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.ownership import Stalls
from calmrun.streams.ports import Failures, Losses, Running, Takeover
from calmrun.streams.restore import Restore
from calmrun.streams.runtable import RunTable
from calmrun.streams.shared import Shared
from calmrun.streams.timers import Timers
from calmrun.streams.txn import FENCED, Gate, PartitionWriter, close_writers

log = logging.getLogger("calmrun.worker")

RETAKES, RETAKE_WINDOW_S = 3, 60.0
"""A partition whose producer broke is taken over again at most this often in this window, then we stop."""


@dataclass
class _Held:
    table: RunTable
    state_end: int


class Writers:
    """Makes the transactional writer of a partition (not started: starting it fences the previous owner)."""

    def __init__(self, settings: Settings, checkpoint: Checkpoint, gate: Gate) -> None:
        self.settings, self._checkpoint, self._gate = settings, checkpoint, gate

    def make(self, p: int, partitions: Losses) -> PartitionWriter:
        """The writer of ``p``; a failed transaction is reported to ``partitions`` (``lost``)."""
        w = self.settings.worker
        return PartitionWriter(
            p,
            clients.transactional_producer(self.settings, p),
            self.settings.group_id,
            self._checkpoint,
            self._gate,
            partitions,
            w.inline_wait_ms / 1000,
            linger_s=w.busy_linger_ms / 1000,
            linger_from=w.busy_linger_from,
            max_request_size=self.settings.kafka.max_request_size,
            spare=clients.spare_producer(self.settings, p),
            ahead_s=self.settings.kafka.txn_ahead_ms / 1000,
        )


class Partitions:
    """Changes the ownership of one worker's partitions; see the module docstring.

    Args:
        running: the attempts running here: cancelled when their partition goes.
        takeovers: told of the partitions newly owned, in order (held commands, resumed attempts).
        failures: a writer failed for another reason than fencing: the worker must stop.
    """

    def __init__(
        self,
        shared: Shared,
        stalls: Stalls,
        restore: Restore,
        checkpoint: Checkpoint,
        gate: Gate,
        timers: Timers,
        running: Running,
        takeovers: Sequence[Takeover],
        failures: Failures,
    ) -> None:
        self.topics, self._own, self._stalls, self._restore = shared.topics, shared.ownership, stalls, restore
        self._checkpoint, self._timers, self._tasks = checkpoint, timers, running
        self._writers = Writers(shared.settings, checkpoint, gate)
        self._takeovers, self._failures = takeovers, failures
        self._held: dict[int, _Held] = {}
        self._retakes: dict[int, list[float]] = {}  # partition -> monotonic times it was taken over again
        self._background: set[asyncio.Task[None]] = set()  # retakes and closes: held until they end
        self._closed = False  # close() began: a rebalance callback after it takes and gives up nothing

    async def close(self) -> None:
        """Commit what is decided, even after a failure (a failed writer's flush returns at once); close.

        A rebalance callback in flight (a stop during the first assignment) ends first, so that the writers
        it makes are closed here too; one that comes after takes nothing.
        """
        own = self._own
        self._closed = True
        async with own.lock:
            await close_writers(own.writers.values())
            own.owned.clear()
            own.writers.clear()

    # -- rebalances ---------------------------------------------------------------------------------

    async def revoked(self, parts: set[int]) -> None:
        """Commit what is decided for ``parts``, stop deciding; hold their runs for the next assignment."""
        own = self._own
        own.stable.clear()
        own.rebalancing = True
        async with own.lock:
            if self._closed:
                return
            assert own.restorer is not None
            writers = {p: own.writers.pop(p) for p in parts if p in own.writers}
            own.owned -= parts
            await asyncio.gather(*(wr.flush() for wr in writers.values()))
            healthy = [p for p, wr in writers.items() if wr.failed is None and p in own.runs]
            if healthy:
                tps = {p: TopicPartition(self.topics.state, p) for p in healthy}
                ends = await own.restorer.end_offsets(list(tps.values()))
                for p in healthy:
                    self._held[p] = _Held(own.runs.pop(p), ends[tps[p]])
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
        own = self._own
        async with own.lock:
            if self._closed:  # the worker stops: nothing is taken over any more
                return
            assert own.consumer is not None and own.restorer is not None
            if retake and (own.rebalancing or not self._assigned_to_us(parts)):
                return
            for p in set(self._held) - parts:
                self._held.pop(p)
                await self._tasks.cancel({p})
                self.discard(p)
            new = own.restoring = parts - own.owned
            own.consumer.pause(*[tp for p in new for tp in own.input_tps(p)])
            writers = {p: self._writers.make(p, self) for p in new}
            await asyncio.gather(*(wr.start() for wr in writers.values()))
            own.writers.update(writers)  # a state record the restore parks is written by its partition's
            state_tps = {p: TopicPartition(self.topics.state, p) for p in new}
            ends = await own.restorer.end_offsets(list(state_tps.values())) if new else {}
            restore: set[int] = set()
            for p in new:
                held = self._held.pop(p, None)
                if held is not None and held.state_end == ends[state_tps[p]]:
                    own.runs[p] = held.table
                    own.counts.kept_partitions += 1
                else:
                    if held is not None:
                        await self._tasks.cancel({p})
                        self.discard(p)
                    restore.add(p)
            if restore:
                await self._restore.runs(restore)
            for p in new:
                await self._restore.seek_committed(p)
                for run_id, state in own.runs[p].live():
                    due = state.next_due_ms()
                    if due is not None:
                        self._timers.push(due, p, run_id)
            own.owned |= new
            own.restoring = set()
            own.assigned_once.set()
            own.consumer.resume(*[tp for p in new for tp in own.input_tps(p)])
            self._stalls.ran()
        own.rebalancing = False
        own.stable.set()
        for takeover in self._takeovers:
            takeover.taken(new)
        log.info(
            "partitions assigned: %s (restored %s, kept %s; %d runs restored so far)",
            sorted(parts),
            sorted(restore),
            sorted(new - restore),
            own.counts.restored_runs,
        )

    def discard(self, p: int) -> None:
        """Forget everything about partition ``p`` (its tasks are cancelled already)."""
        self._own.runs.pop(p, None)
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
            self._spawn(self._retake(p, writer))
            return
        if not isinstance(exc, FENCED):
            self._failures.fail(exc)
            return
        self._own.counts.fenced += 1
        log.warning("partition %d was taken over by another worker (%r): dropping its runs", p, exc)
        writer = self._drop(p)
        if writer is not None:
            self._spawn(writer.close())

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` beside the caller, holding its task until it ends (the loop keeps only a weak one)."""
        task = asyncio.get_running_loop().create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop(self, p: int) -> PartitionWriter | None:
        """Stop deciding ``p`` and forget its runs; returns its writer, to close."""
        own = self._own
        own.owned.discard(p)
        writer = own.writers.pop(p, None)
        if own.consumer is not None:
            with contextlib.suppress(Exception):
                own.consumer.pause(*own.input_tps(p))
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
        self._own.counts.retaken += 1
        try:
            await self.assigned({p}, retake=True)
        except Exception as exc:  # the broker is not back yet, or worse: the worker cannot go on
            self._failures.fail(exc)

    def _assigned_to_us(self, parts: set[int]) -> bool:
        assert self._own.consumer is not None
        assignment: set[TopicPartition] = self._own.consumer.assignment()
        return {tp for p in parts for tp in self._own.input_tps(p)} <= assignment

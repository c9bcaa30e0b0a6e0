"""How this worker's ownership changes: rebalances, its writer, fencing, retakes.

The worker writes the decisions of all its partitions through one transactional writer (``streams.txn``:
one transaction per cycle, Kafka Streams' exactly-once v2), and every input offset it commits names that
writer's transactional id (the offsets' metadata). A partition is owned once whoever wrote it before is
fenced, its offsets name this worker, its runs are in memory (``streams.restore``), and its input positions
are the committed offsets:

- *Fenced.* Taking ``p`` over, the worker reads whose ids ``p``'s committed offsets name and initialises
  each one, which aborts what that writer left open and fences it (a crashed, paused or partitioned
  worker's late records never reach a ``read_committed`` reader), unless the group's last assignment says a
  member still writes under it: a member that only gives partitions up commits what it holds before it
  rejoins (aiokafka's rebalances are eager), so it is left alone. Offsets that name no worker (an earlier
  calmrun's, one writer per partition) fence that partition's ids, ``<group>.tx.<p>``.
- *Named.* Then it commits ``p``'s offsets again, named its own, in a transaction before any of ``p``'s
  decisions (``TxnWriter.adopt``): whoever takes ``p`` next knows whom to fence.

A rebalance restores only what is new: a revoked partition's runs are held, and reused when the same
partition comes back with the state topic's end offset unchanged. A writer refused by the broker
(``ProducerFenced``) means another worker took this one's partitions over: all are dropped here, and the
worker rejoins the group. What is owned now is ``streams.ownership``'s table, which the other rooms read;
this room alone changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import TopicPartition

from calmrun.errors import WriterBrokenError
from calmrun.settings import Settings
from calmrun.streams import clients
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.gate import Gate
from calmrun.streams.ownership import Stalls
from calmrun.streams.ports import Failures, GroupWriters, Losses, Running, Takeover
from calmrun.streams.restore import Restore
from calmrun.streams.runtable import RunTable
from calmrun.streams.shared import Shared
from calmrun.streams.timers import Timers
from calmrun.streams.txn import TxnWriter, close_writers, on_lane, transactional_id
from calmrun.streams.txnstate import FENCED
from calmrun.streams.versions import request_rejoin

log = logging.getLogger("calmrun.worker")

RETAKES, RETAKE_WINDOW_S = 3, 60.0
"""The writer, its producer broken, is replaced at most this often in this window, then we stop."""

_FENCE_ROUNDS = 3  # fences at most on a takeover, each followed by another read of the offsets' names


@dataclass
class _Held:
    table: RunTable
    state_end: int


class Writers:
    """Makes the worker's transactional writer (not started: starting it fences the same id's last writer).

    Args:
        txn_id: the writer's transactional id for the worker's life (``txn.worker_transactional_id``).
    """

    def __init__(self, settings: Settings, checkpoint: Checkpoint, gate: Gate, txn_id: str) -> None:
        self.settings, self._checkpoint, self._gate, self.txn_id = settings, checkpoint, gate, txn_id

    def make(self, losses: Losses) -> TxnWriter:
        """A writer for no partition yet; a failed transaction is reported to ``losses`` (``lost``)."""
        s, w = self.settings, self.settings.worker
        return TxnWriter(
            self.txn_id,
            clients.worker_producer(s, self.txn_id),
            s.group_id,
            self._checkpoint,
            self._gate,
            losses,
            metadata=self.txn_id,
            hold_s=w.inline_wait_ms / 1000,
            linger_s=w.busy_linger_ms / 1000,
            linger_from=w.busy_linger_from,
            max_request_size=s.kafka.max_request_size,
            spare=clients.worker_producer(s, self.txn_id, 1) if s.kafka.txn_lanes == 2 else None,
            ahead_s=s.kafka.txn_ahead_ms / 1000,
        )

    async def fence(self, tids: Iterable[str]) -> None:
        """Initialise each of ``tids`` (both lanes): what their writers left open is aborted, and they are
        fenced. Each producer is stopped at once; it only initialises."""

        async def one(tid: str) -> None:
            producer = clients.txn_producer(self.settings, tid, "fence")
            try:
                await producer.start()
            finally:
                await producer.stop()

        await asyncio.gather(*(one(on_lane(t, lane)) for t in set(tids) for lane in (0, 1)))


class Partitions:
    """Changes the ownership of one worker's partitions; see the module docstring.

    Args:
        running: the attempts running here: cancelled when their partition goes.
        takeovers: told of the partitions newly owned, in order (held commands, resumed attempts).
        failures: a writer failed for another reason than fencing: the worker must stop.
        writers: this worker's writer's transactional id and those of the group's members.
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
        writers: GroupWriters,
    ) -> None:
        self.topics, self._own, self._stalls, self._restore = shared.topics, shared.ownership, stalls, restore
        self._checkpoint, self._timers, self._tasks = checkpoint, timers, running
        self._writers = Writers(shared.settings, checkpoint, gate, writers.txn)
        self._group_id, self._group = shared.settings.group_id, writers
        self._takeovers, self._failures = takeovers, failures
        self._held: dict[int, _Held] = {}
        self._retakes: list[float] = []  # monotonic times the writer was replaced (its producer broke)
        self._background: set[asyncio.Task[None]] = set()  # retakes and closes: held until they end
        self._closed = False  # close() began: a rebalance callback after it takes and gives up nothing

    async def close(self) -> None:
        """Commit what is decided, even after a failure (a failed writer's flush returns at once); close.

        A rebalance callback in flight (a stop during the first assignment) ends first, so that the writer
        it makes is closed here too; one that comes after takes nothing.
        """
        own = self._own
        self._closed = True
        async with own.lock:
            if own.writer is not None:
                await close_writers([own.writer])
            own.owned.clear()
            own.writer = None

    # -- rebalances ---------------------------------------------------------------------------------

    async def revoked(self, parts: set[int]) -> None:
        """Commit what is decided, stop deciding ``parts``; hold their runs for the next assignment."""
        own = self._own
        own.stable.clear()
        own.rebalancing = True
        async with own.lock:
            if self._closed:
                return
            assert own.restorer is not None
            writer = own.writer
            mine = parts & own.owned
            own.owned -= parts
            if writer is not None:
                await writer.flush()
                writer.give_up(parts)
            healthy = [p for p in mine if writer is not None and writer.failed is None and p in own.runs]
            if healthy:
                tps = {p: TopicPartition(self.topics.state, p) for p in healthy}
                ends = await own.restorer.end_offsets(list(tps.values()))
                for p in healthy:
                    self._held[p] = _Held(own.runs.pop(p), ends[tps[p]])
            for p in parts - set(healthy):
                self.discard(p)
            self._checkpoint.forget(parts)
            self._timers.drop(parts)

    async def assigned(self, parts: set[int], *, retake: bool = False) -> None:
        """Take ``parts`` over: fence whoever wrote them before, name their offsets ours, restore the runs
        not held, resume fetching.

        ``retake``: not a rebalance but the partitions of a writer whose producer broke (``lost``); skipped
        when a rebalance began meanwhile or the group no longer gives us ``parts``."""
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
            if own.writer is None:
                writer = self._writers.make(self)
                await writer.start()  # fences the writer of the same id before it (a retake's, a restart's)
                own.writer = writer
            if new:
                found = await self._fence(new)
                await own.writer.adopt(new, found)  # a state record the restore parks is written by it
                if own.writer is None or own.writer.failed is not None:
                    own.restoring = set()  # fenced or broken meanwhile: ``lost`` dropped what we had
                    own.rebalancing = False
                    own.stable.set()
                    return
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

    async def _fence(self, parts: set[int]) -> dict[TopicPartition, int]:
        """Fence every writer that ``parts``' committed offsets name and the group does not (see the module
        docstring); the committed positions once no other is named (0 where none is committed: read from
        the beginning, as ``Restore.seek_committed`` does)."""
        own = self._own
        assert own.consumer is not None
        tps = [tp for p in sorted(parts) for tp in own.input_tps(p)]
        mine = self._writers.txn_id
        members = self._group.group_txns
        fenced: set[str] = set()
        for rounds_left in range(_FENCE_ROUNDS, -1, -1):
            # read after every fence: a fenced writer's last commit may have moved the positions
            committed = await own.consumer._coordinator.fetch_committed_offsets(tps)  # with their metadata
            named = {tp: om.metadata for tp, om in committed.items() if om.metadata}
            tids = set(named.values()) - {mine} - (members if members is not None else set(named.values()))
            legacy = {
                transactional_id(self._group_id, p)
                for p in parts
                if not any(tp in named for tp in own.input_tps(p))  # an earlier calmrun's, or nobody's
            }
            todo = (tids | legacy) - fenced
            if not todo or not rounds_left:
                break
            log.info("fencing the writers that wrote partitions %s before: %s", sorted(parts), sorted(todo))
            await self._writers.fence(todo)
            fenced |= todo
        return {tp: committed[tp].offset if tp in committed else 0 for tp in tps}

    def discard(self, p: int) -> None:
        """Forget everything about partition ``p`` (its tasks are cancelled already)."""
        self._own.runs.pop(p, None)
        self._held.pop(p, None)
        self._checkpoint.forget({p})
        self._tasks.forget(p)
        self._timers.drop({p})

    def lost(self, parts: set[int], exc: BaseException) -> None:
        """A transaction of the writer failed: fenced means another worker took ``parts`` over (the worker
        rejoins the group); a broken producer is replaced (``parts`` are taken over again, as on an
        assignment); anything else stops us."""
        writer = self._own.writer
        if isinstance(exc, WriterBrokenError) and self._may_retake():
            log.warning("%s: taking partitions %s over again with a new producer", exc, sorted(parts))
            self._drop(parts)
            self._spawn(self._retake(parts, writer))
            return
        if not isinstance(exc, FENCED):
            self._failures.fail(exc)
            return
        self._own.counts.fenced += len(parts)
        log.warning(
            "partitions %s were taken over by another worker (%r): dropping their runs", sorted(parts), exc
        )
        self._drop(parts)
        if writer is not None:
            self._spawn(writer.close())
        request_rejoin(self._own.consumer)  # to be given partitions again, with a new writer

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` beside the caller, holding its task until it ends (the loop keeps only a weak one)."""
        task = asyncio.get_running_loop().create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop(self, parts: set[int]) -> None:
        """Stop deciding ``parts`` and forget their runs; the writer goes (a new one is made when partitions
        are assigned again)."""
        own = self._own
        own.owned -= parts
        own.writer = None
        if own.consumer is not None:
            with contextlib.suppress(Exception):
                own.consumer.pause(*[tp for p in parts for tp in own.input_tps(p)])
        for p in parts:
            self._tasks.cancel_now(p)
            self.discard(p)

    def _may_retake(self) -> bool:
        """At most ``RETAKES`` in ``RETAKE_WINDOW_S``; past that the worker stops instead."""
        now = time.monotonic()
        recent = self._retakes = [t for t in self._retakes if now - t < RETAKE_WINDOW_S]
        if len(recent) >= RETAKES:
            return False
        recent.append(now)
        return True

    async def _retake(self, parts: set[int], writer: TxnWriter | None) -> None:
        """Take ``parts`` over again, as an assignment does: a new producer under the same transactional id
        settles the broken one's open transaction; the runs are restored; the inputs re-read from the
        committed offsets."""
        if writer is not None:
            await writer.close()
        self._own.counts.retaken += 1
        try:
            await self.assigned(parts, retake=True)
        except Exception as exc:  # the broker is not back yet, or worse: the worker cannot go on
            self._failures.fail(exc)

    def _assigned_to_us(self, parts: set[int]) -> bool:
        assert self._own.consumer is not None
        assignment: set[TopicPartition] = self._own.consumer.assignment()
        return {tp for p in parts for tp in self._own.input_tps(p)} <= assignment

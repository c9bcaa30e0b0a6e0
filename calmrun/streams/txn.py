"""A worker's output as Kafka transactions: a decision's records, the states and the input offsets it
finished become visible together, or not at all (a lazy input's offset may follow in a later one: ``add``).

A ``TxnWriter`` writes the decisions of a set of partitions in one transaction per cycle. A deciding worker
holds one for all the partitions it owns, ``transactional.id`` = ``<group>.tx.w<random>`` for the worker's
life (``worker_transactional_id``; Kafka Streams' exactly-once v2, KIP-447); a pool executor holds one per
partition, ``<group>.tx.<partition>`` (``transactional_id``). Either way, initialising the id of the one
that wrote a partition before aborts any transaction it left open and fences it: a crashed, paused or
partitioned worker's late records never reach a ``read_committed`` reader, and its late commits fail
(``ProducerFenced``). Who initialises which id on a takeover is ``streams.partitions``'s: every input offset
a worker commits names its id (the offsets' metadata), so the next owner knows whom to fence.

Decisions are batched: the decisions added while a transaction is being written go in the next one, so
light load commits each decision alone and heavy load amortises a commit over many. Within a batch only the
newest state of each run is written (compaction keeps only that one). Each decision comes with the inputs
it answers; as a batch is taken, the checkpoint (``streams.checkpoint``) finishes them and gives the input
offsets to commit in the same transaction. After the commit, each decision's ``on_commit`` runs, in commit
order, a few per turn of the event loop (``streams.aftercommit``; a flush waits for all). A task decided
from a committed input may have been started before (``hold``): the next transaction then waits up to
``hold_s`` for those tasks, so a fast step's result commits with the decision that scheduled it (see
``streams.decisions``). A writer that just sent a large batch (``linger_from`` decisions or more) waits
``linger_s`` before it takes the next one (``worker.busy_linger_ms``); a small batch never waits.

Two lanes, two transactions in flight. After a commit the broker still writes that transaction's markers for a
few milliseconds, and refuses the same transactional id's next transaction until it is done
(CONCURRENT_TRANSACTIONS). A writer given a ``spare`` producer (its own transactional id, ``on_lane(id, 1)``)
writes its transactions on the two in turn. Once a transaction's records are sent, its commit goes on its way
(``_ending``) and the writer takes the next batch, onto the other lane: its records go out once the last one's
are written (a run's records stay in decision order) while the last one commits, and its own commit is sent
only once the last one's returned, so transactions commit in the order they were taken, and a decision that
follows from one still on its way never commits without it (one that fails fails the writer; the next, sent
but not committed, is aborted by whoever initialises the ids next). As a commit goes, the writer begins the
next transaction *ahead* on the other lane, with the committing one's partitions already added, whether a
batch waits or not. Input offsets commit on the first lane only, so that they never go back: a transaction's
offsets become the group's when its markers are written, and the two lanes' markers may be written in either
order. A batch with offsets that must commit with it goes on the first lane (after the first lane's last
commit); lazy offsets wait for its next transaction. A transaction begun ahead that gets no decision within
``ahead_s`` is aborted (markers, no record), and lazy offsets that moved commit then, alone, so that an idle
writer leaves none behind; one begun ahead and still empty when the writer closes is aborted too. Starting the
writer initialises both ids: both of the previous owner's lanes are fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from calmrun.errors import WriterBrokenError
from calmrun.streams.aftercommit import AfterCommit
from calmrun.streams.checkpoint import Checkpoint, Pending
from calmrun.streams.gate import Gate
from calmrun.streams.ports import Losses
from calmrun.streams.records import Out, StateOut
from calmrun.streams.txnbatches import Batches, require_batch_sends, retrieved
from calmrun.streams.txnstate import FENCED, add_ahead, can_add_ahead, fenced_meanwhile, transaction_error

log = logging.getLogger("calmrun.worker")

_MAX_BATCH = 2_000  # decisions per transaction at most, so that one commit stays short


def transactional_id(group_id: str, partition: int, lane: int = 0) -> str:
    """The transactional id of ``partition``'s writer on ``lane`` (0 or 1, see the module docstring): a pool
    executor's, per partition of its group, never per process; a deciding worker of an earlier calmrun wrote
    under it too, so a takeover fences it (``streams.partitions``)."""
    return on_lane(f"{group_id}.tx.{partition}", lane)


def worker_transactional_id(group_id: str, instance_id: str | None = None) -> str:
    """The transactional id of one deciding worker's writer, for all its partitions, under the prefix
    ``<group>.tx.`` that the ACLs grant (``calmrun.acls``). Random for each worker's life, so no two workers
    share one; a static member's (``worker.instance_id``) is its instance's, so that its restart, which
    the group does not see, fences the transactions of the process before it."""
    if instance_id:
        return f"{group_id}.tx.i.{instance_id}"
    return f"{group_id}.tx.w{uuid.uuid4().hex[:12]}"


def on_lane(base: str, lane: int) -> str:
    """The id of the writer with transactional id ``base`` on ``lane``: the second lane adds ``.b``."""
    return base + (".b" if lane else "")


@dataclass
class _Queued:
    """What one decision of ``partition`` queued for the next transaction."""

    partition: int
    outputs: list[Out]
    state: StateOut | None
    on_commit: Callable[[], None] | None
    run_id: str | None
    inputs: Sequence[Pending]
    lazy: bool


class TxnWriter:
    """Commits the decisions of its partitions in transactions; see the module docstring.

    Args:
        name: what the logs and errors call it (the partition, or the worker's transactional id).
        producer: a producer configured with the writer's transactional id (not started).
        group_id: the consumer group whose offsets are committed in the transactions.
        checkpoint: finishes the inputs of each batch taken and gives the input offsets to commit with it;
            told of them once their transaction committed.
        gate: the worker's count of uncommitted decisions.
        losses: told once if a transaction fails (``lost``, with every partition the writer had); the
            writer is unusable after that.
        partitions: the partitions (their number in every calmrun topic) it writes for now; ``adopt`` adds,
            ``give_up`` takes away.
        metadata: the metadata of every input offset it commits: whose they are (``streams.partitions``).
        hold_s: how long a transaction waits, at most, for the tasks given to ``hold``.
        max_request_size: the producer's ``max_request_size``: a larger record fails its transaction.
        spare: a producer configured with the transactional id ``on_lane(id, 1)`` (not started): the second
            lane; None: every transaction on ``producer`` (see the module docstring).
        ahead_s: how long a transaction begun ahead on the other lane waits for a decision before it is
            aborted (0: none is begun ahead).

    A batch whose moved offsets may all wait (the checkpoint says so: they pass only lazy inputs, see
    ``add``) commits without them: two requests fewer (AddOffsetsToTxn, TxnOffsetCommit), one round trip
    fewer in a row; they commit with the next batch that finishes a strict input, or with the first
    transaction after a ``kick`` (the worker's commit loop, every ``worker.commit_interval_s``), and always
    before ``flush`` returns.
    """

    def __init__(
        self,
        name: str,
        producer: AIOKafkaProducer,
        group_id: str,
        checkpoint: Checkpoint,
        gate: Gate,
        losses: Losses,
        partitions: Iterable[int] = (),
        *,
        metadata: str = "",
        hold_s: float = 0.0,
        linger_s: float = 0.0,
        linger_from: int = 1,
        max_request_size: int = 1_048_576,
        spare: AIOKafkaProducer | None = None,
        ahead_s: float = 0.0,
    ) -> None:
        require_batch_sends()
        self.name = name
        self.partitions = set(partitions)
        self._metadata = metadata
        self._adopted: dict[TopicPartition, int] = {}  # positions ``adopt`` commits with the next transaction
        self._group_id = group_id
        self._checkpoint = checkpoint
        self._gate = gate
        self._losses = losses
        self._batch: list[_Queued] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None
        self.commits = 0
        self._probing = False
        self._open: Counter[str] = Counter()  # run ID -> its decisions not yet committed
        self._hold_s = hold_s
        self._linger_s, self._linger_from = linger_s, linger_from
        self._max_request_size = max_request_size
        self._held: set[asyncio.Future[None]] = set()
        self._held_until = 0.0
        self._closing = False
        self._broken: BaseException | None = None  # why the producer's sender ended, if it did
        self._taken = 0  # decisions of the transaction being written: still counted by the gate
        self._flushing = False  # a flush waits: commit every moved offset, lazy ones included
        self._due = False  # kicked: the next transaction commits every moved offset, lazy ones included
        self._lanes = [producer] if spare is None else [producer, spare]
        self.lane_commits = [0] * len(self._lanes)  # transactions committed on each lane
        self._lane = 0  # the lane of the last transaction
        self._ahead_s = ahead_s if spare is not None and can_add_ahead(spare) else 0.0
        self._ahead: AIOKafkaProducer | None = None  # the lane with an empty transaction begun ahead
        self._ahead_expired = False
        self._ahead_timer: asyncio.TimerHandle | None = None
        self._ending: asyncio.Task[None] | None = None  # the commit of the last transaction sent, if pending
        self._ending_lane = 0
        self._ending_sent: list[asyncio.Future[Any]] = []  # its records, each resolved once in the log
        self._after = AfterCommit(self._after_ran)  # committed decisions' on_commit, not run yet
        self._after_failed: BaseException | None = None  # what an on_commit raised

    async def start(self) -> None:
        """Initialise the transactional ids: aborts the previous owner's open transactions and fences it."""
        await asyncio.gather(*(p.start() for p in self._lanes))
        self._task = asyncio.create_task(self._run(), name=f"calmrun-txn-{self.name}")
        for p in self._lanes:
            sender = getattr(getattr(p, "_sender", None), "sender_task", None)  # aiokafka 0.14
            if isinstance(sender, asyncio.Task):
                sender.add_done_callback(self._sender_ended)

    def _sender_ended(self, sender: asyncio.Task[Any]) -> None:
        """aiokafka's sender routine ended while the writer is open: no transaction can finish any more (an
        operation waiting on it may never return), so the writer fails now, with the sender's error."""
        if self._closing:
            return
        exc = None if sender.cancelled() else sender.exception()
        self._broken = exc if isinstance(exc, FENCED) else WriterBrokenError(self.name, exc)
        if self._task is not None:
            self._task.cancel()

    def add(
        self,
        p: int,
        outputs: list[Out],
        state: StateOut | None,
        on_commit: Callable[[], None] | None,
        run_id: str | None = None,
        *,
        inputs: Sequence[Pending],
        lazy: bool = False,
    ) -> None:
        """Queue one decision of partition ``p`` for the next transaction; synchronous, so decisions keep
        their order.

        ``inputs``: the consumed records it answers, finished as it is taken into a transaction.
        ``lazy``: they need not commit with it, because re-read after a crash they are recognised and
        ignored (an accepted run request, a result or task record of an attempt decided here); their
        offsets may then follow in a later transaction. Strict (the default): they commit with it.
        """
        self._batch.append(_Queued(p, outputs, state, on_commit, run_id, inputs, lazy))
        if run_id is not None:
            self._open[run_id] += 1
        self._gate.add(1)
        self._idle.clear()
        self._wake.set()

    def quiet(self, run_id: str) -> bool:
        """Has ``run_id`` no decision here that is not committed yet?"""
        return run_id not in self._open

    def hold(self, tasks: Iterable[asyncio.Future[None]]) -> None:
        """Let the next transaction wait (``hold_s`` at most) until these tasks have added their decisions."""
        if self._hold_s <= 0:
            return
        if not self._held:
            self._held_until = asyncio.get_running_loop().time() + self._hold_s
        self._held.update(tasks)

    def kick(self) -> None:
        """Commit the input offsets that moved, lazy ones included, with the next transaction (alone if
        nothing is queued): settled inputs', and lazy ones' that a busy writer, whose every batch may
        wait, would otherwise leave behind for good."""
        self._due = True
        self._idle.clear()
        self._wake.set()

    async def probe(self) -> None:
        """Commit a transaction even with nothing new: it fails (fenced) if another worker took over."""
        self._probing = True
        await self.flush()

    async def adopt(self, parts: Iterable[int], positions: Mapping[TopicPartition, int]) -> None:
        """Write for ``parts`` from now on, after committing their inputs' ``positions`` (as found) in a
        transaction of their own: from then on their offsets name this writer (``metadata``), before it
        writes anything to them (``streams.partitions``). Returns once committed, or the writer failed."""
        self.partitions.update(parts)
        self._adopted.update(positions)
        await self.flush()

    def give_up(self, parts: Iterable[int]) -> None:
        """Write no more for ``parts`` (flushed before: nothing of theirs is queued)."""
        self.partitions.difference_update(parts)

    @property
    def begun_ahead(self) -> bool:
        """Is a transaction begun ahead, still empty (see the module docstring)?"""
        return self._ahead is not None

    @property
    def pending(self) -> int:
        return len(self._batch)

    async def flush(self) -> None:
        """Wait until every decision added so far, and every input offset finished, is committed (or the
        writer failed)."""
        if self.failed is not None:
            return
        self._flushing = True
        self.kick()
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the writer; a transaction not committed by now is aborted by the broker or the next owner
        (one begun ahead and still empty is aborted here, so that the next owner need not wait for it)."""
        self._closing = True
        for task in (self._task, self._ending):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._ahead is not None and self.failed is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._abort_ahead(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(p.stop() for p in self._lanes)), 10)
        self._after.run_all()  # committed: their callbacks run
        # the queued decisions and a transaction cut short (fenced, closed) never commit: let them go
        self._gate.done(len(self._batch) + self._taken)
        self._batch.clear()
        self._taken = 0
        self._idle.set()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                if self._after_failed is not None:
                    raise self._after_failed
                if self._ending is not None and self._ending.done():
                    await self._ended()  # raises what ended it, if it failed
                if not self._work():  # only a commit ended: nothing to send
                    self._wake.clear()
                    if self._settled():
                        self._idle.set()
                    continue
                await self._wait_held()
                if self._probing:
                    await self._ended()  # a probe commits the last committed positions again: settle them
                self._wake.clear()
                batch, self._batch = self._batch[:_MAX_BATCH], self._batch[_MAX_BATCH:]
                if self._batch:
                    self._wake.set()
                # no await since the batch was taken
                offsets, may_wait = self._take(batch, whole=not self._batch)
                if self._probing and not (batch or offsets):
                    for p in self.partitions:
                        offsets.update(self._checkpoint.last(p))
                self._probing = False
                due, self._due = self._due or self._flushing, False
                adopted, self._adopted = self._adopted, {}
                deferred = bool(batch and offsets and not due and may_wait and not adopted)
                if deferred:
                    offsets = {}  # committed by a later transaction (see ``add``)
                offsets.update(adopted)
                lane = self._next_lane(strict=bool(offsets))
                if batch or offsets:
                    self._taken += len(batch)
                    await self._commit(lane, batch, offsets)
                elif self._ahead_expired and self._ahead is not None:
                    await self._abort_ahead()  # nothing came for it: no transaction stays open while idle
                if (
                    self._linger_s > 0
                    and len(batch) >= self._linger_from
                    and not (self._closing or self._flushing)
                ):
                    await asyncio.sleep(self._linger_s)  # busy: let the next batch grow (busy_linger_ms)
                if deferred and self._flushing:  # a flush began meanwhile: commit them now
                    self._wake.set()
                elif not self._batch and self._settled():
                    self._flushing = False
                    self._idle.set()
        except asyncio.CancelledError:
            if self._broken is None or self._closing:
                raise
            self._fail(self._broken)
        except BaseException as exc:
            self._fail(fenced_meanwhile(self._lanes) or exc)

    def _take(self, batch: list[_Queued], whole: bool) -> tuple[dict[TopicPartition, int], bool]:
        """Finish the inputs the batch's decisions answer, by partition (``Checkpoint.take``); the positions
        that moved, and whether they may all wait for a later transaction."""
        strict: dict[int, list[Pending]] = {}
        lazy: dict[int, list[Pending]] = {}
        for d in batch:
            (lazy if d.lazy else strict).setdefault(d.partition, []).extend(d.inputs)
        offsets: dict[TopicPartition, int] = {}
        may_wait = True
        for p in self.partitions.union(strict, lazy):
            taken = self._checkpoint.take(p, strict.get(p, ()), whole=whole, lazy=lazy.get(p, ()))
            offsets.update(taken.positions)
            may_wait = may_wait and taken.may_wait
        return offsets, may_wait

    def _fail(self, cause: BaseException) -> None:
        if self._ending is not None:
            self._ending.add_done_callback(retrieved)
            self._ending.cancel()  # a commit still on its way counts for nothing here: the partitions go
        self.failed = cause
        self._idle.set()
        self._losses.lost(set(self.partitions), cause)

    def _next_lane(self, strict: bool) -> int:
        """The lane of the next transaction: the first for input offsets that must commit with it (or
        when there is one lane), else the one begun ahead, else the one not used last."""
        if len(self._lanes) == 1 or strict:
            return 0
        if self._ahead is not None:
            return self._lanes.index(self._ahead)
        return 1 - self._lane  # the last one sent, whose commit may still be on its way

    async def _begin_ahead(self, lane: int, partitions: Iterable[TopicPartition]) -> None:
        """Begin the next transaction now on ``lane`` and add ``partitions`` to it (see the module
        docstring)."""
        producer = self._lanes[lane]
        await producer.begin_transaction()
        self._ahead = producer
        self._ahead_expired = False
        add_ahead(producer, partitions)
        self._ahead_timer = asyncio.get_running_loop().call_later(self._ahead_s, self._expire_ahead)

    def _expire_ahead(self) -> None:
        self._ahead_expired = True
        self._wake.set()

    def _take_ahead(self) -> AIOKafkaProducer | None:
        """The lane with the transaction begun ahead, no longer waiting for a decision (its timer stopped)."""
        producer, self._ahead = self._ahead, None
        self._ahead_expired = False
        if self._ahead_timer is not None:
            self._ahead_timer.cancel()
        return producer

    async def _abort_ahead(self) -> None:
        producer = self._take_ahead()
        if producer is not None:
            await producer.abort_transaction()

    async def _wait_held(self) -> None:
        """Wait for the tasks started early from decisions of this batch, until ``hold_s`` has passed."""
        loop = asyncio.get_running_loop()
        while self._held:
            running = {t for t in self._held if not t.done()}
            left = self._held_until - loop.time()
            if not running or left <= 0:
                break
            await asyncio.wait(running, timeout=left)
        self._held.clear()

    async def _commit(self, lane: int, batch: list[_Queued], offsets: dict[TopicPartition, int]) -> None:
        """Send a transaction on ``lane`` and leave its commit on its way (``_ending``): two in flight, and
        they commit in the order taken (see the module docstring)."""
        if self._ending is not None and self._ending_lane == lane:
            await self._ended()  # one transaction at a time on a lane
        elif self._ending is not None:  # the two lanes' produce requests would race: the last one's first
            await asyncio.gather(*self._ending_sent)
        try:
            futures, partitions = await self._send(lane, batch, offsets)
        except IllegalOperation as exc:
            # a fencing met by an earlier send of this batch leaves the producer out of its transaction:
            # the next send says only "not in transaction"; the cause is the transaction's own error
            raise transaction_error(self._lanes[lane]) or exc from exc
        self._lane = lane
        if self._ending is not None:
            await self._ended()
        self._ending = asyncio.ensure_future(self._end(lane, batch, offsets, futures))
        self._ending_lane, self._ending_sent = lane, futures
        self._ending.add_done_callback(self._wake_on_end)
        if self._ahead_s > 0 and self._ahead is None and not self._closing:
            # while this one commits: AddPartitionsToTxn is on its way while EndTxn is, and the next
            # decision usually finds its partitions added
            await asyncio.sleep(0)  # the commit is marked first, so that EndTxn goes out first
            if self._ending is not None and not self._ending.done():
                await self._begin_ahead(1 - lane, partitions)

    def _wake_on_end(self, ending: asyncio.Task[None]) -> None:  # the loop settles it (fail, or idle)
        if ending is self._ending:
            self._wake.set()

    def _work(self) -> bool:
        """Is there anything to send: decisions, offsets asked for, or a transaction begun ahead to end?"""
        asked = self._due or self._flushing or self._probing or bool(self._adopted)
        return bool(self._batch) or asked or self._ahead_expired

    async def _ended(self) -> None:
        """Wait for the commit on its way; raises what ended it, if it failed."""
        ending, self._ending = self._ending, None
        if ending is not None:
            await ending

    async def _send(
        self, lane: int, batch: list[_Queued], offsets: dict[TopicPartition, int]
    ) -> tuple[list[asyncio.Future[Any]], list[TopicPartition]]:
        """Begin (or take the one begun ahead) on ``lane``, and send the batch's records and ``offsets``."""
        p = self._lanes[lane]
        if self._ahead is p:
            self._take_ahead()  # its transaction is this one
        else:
            if self._ahead is not None and self._ahead_expired:
                await self._abort_ahead()  # kept waiting by strict offsets: no lane stays open for long
            await p.begin_transaction()
        records = Batches(p, self._max_request_size)
        states: dict[tuple[str, bytes], StateOut] = {}
        for d in batch:
            for o in d.outputs:
                await records.add(o.topic, o.partition, o.key, o.value, o.headers)
            if d.state is not None:
                states.pop((d.state.topic, d.state.key), None)  # keep the newest, in decision order
                states[(d.state.topic, d.state.key)] = d.state
        for st in states.values():
            await records.add(st.topic, st.partition, st.key, st.encode(), ())
        futures = await records.close()
        if offsets:
            named = {tp: OffsetAndMetadata(off, self._metadata) for tp, off in offsets.items()}
            await p.send_offsets_to_transaction(named, self._group_id)
        return futures, records.partitions

    async def _end(
        self,
        lane: int,
        batch: list[_Queued],
        offsets: dict[TopicPartition, int],
        futures: list[asyncio.Future[Any]],
    ) -> None:
        """Commit ``lane``'s transaction; then tell the checkpoint, the gate, the decisions' ``on_commit``."""
        p = self._lanes[lane]
        try:
            await p.commit_transaction()
        except IllegalOperation as exc:
            raise transaction_error(p) or exc from exc
        await asyncio.gather(*futures)  # resolved as written (before the commit returns); raises if refused
        self.commits += 1
        self.lane_commits[lane] += 1
        if offsets:
            self._checkpoint.committed(offsets)
        self._gate.done(len(batch))
        self._gate.commits += 1
        self._taken -= len(batch)
        for d in batch:
            if d.run_id is not None:
                self._open[d.run_id] -= 1
                if self._open[d.run_id] <= 0:
                    del self._open[d.run_id]
        self._after.extend(d.on_commit for d in batch if d.on_commit is not None)  # a few per turn

    def _settled(self) -> bool:
        """No commit on its way, and every committed decision's callback has run."""
        return self._ending is None and not self._after

    def _after_ran(self, exc: BaseException | None) -> None:
        """The committed decisions' callbacks all ran (the loop settles it: idle), or one raised (the loop
        raises it: the writer fails, as on a failed commit)."""
        self._after_failed = self._after_failed or exc
        self._wake.set()


async def close_writers(writers: Iterable[TxnWriter], flush_s: float = 30) -> None:
    """Commit what each writer holds (a failed one holds nothing that can commit; all of them for at most
    ``flush_s``), then close them: the deciding worker's and the pool executor's way to let writers go."""
    writers = list(writers)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(w.flush() for w in writers if w.failed is None)), flush_s)
    await asyncio.gather(*(w.close() for w in writers))


async def kick_every(interval_s: float, writers: Callable[[], Iterable[TxnWriter]]) -> None:
    """Every ``interval_s``, kick each of the ``writers()`` of now (``TxnWriter.kick``): input offsets that
    moved without a decision of their own, or with lazy decisions only, commit; the worker's and a pool
    executor's commit loop."""
    while True:
        await asyncio.sleep(interval_s)
        for wr in list(writers()):
            wr.kick()

"""The task runner: step attempts executing in one worker, at most ``max_in_flight`` at once.

A task starts from a task record read back from its step topic, at once when the decision that scheduled
it is committed here (eager), or when a restored state awaits it (resumed: its step writes no task record,
``worker.task_records``). Every record of a running attempt (its own, a copy re-issued after a deadline)
finishes with the decision on the attempt's result, and an eager task's record that arrives after that
decision is settled on arrival (``Checkpoint.settled``); a task with no record waits for none. Nothing
here decides: the runner asks its ``Admission`` port before an agent starts (after a pause the partition
may have moved) and hands each result to its ``ResultSink`` (``streams.ports``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from calmrun.streams.checkpoint import Checkpoint, Pending
from calmrun.streams.ports import Admission, Executor, Failures, ResultSink, Source
from calmrun.streams.records import Out
from calmrun.workflow.events import StepTask

log = logging.getLogger("calmrun.worker")
_FREE: AbstractAsyncContextManager[None] = contextlib.nullcontext()


class Limits(Protocol):
    """What a task waits for before it takes its slot, and holds until it finishes (``Throttle``)."""

    def hold(self, task: StepTask) -> AbstractAsyncContextManager[None] | None: ...


class LocalSource:
    """An eager task's source: its step topic, offset unknown (-1). ``value`` may be given as what encodes
    it (a task with no record: ``records.task_out``), encoded when a dead letter first reads it."""

    __slots__ = ("_value", "headers", "key", "offset", "partition", "topic")

    def __init__(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes | Callable[[], bytes],
        headers: tuple[tuple[str, bytes], ...],
        offset: int = -1,
    ) -> None:
        self.topic, self.partition, self.key, self._value = topic, partition, key, value
        self.headers, self.offset = headers, offset

    @property
    def value(self) -> bytes:
        if callable(self._value):
            self._value = self._value()
        return self._value


@dataclass
class _Running:
    partition: int
    task: asyncio.Task[None] | None = None
    eager: bool = False
    record_seen: bool = False
    pending: list[Pending] = field(default_factory=list)
    cancelled: bool = False  # asked to stop: an agent in a synchronous tool ends only when the tool returns
    again: Callable[[], object] | None = None  # a start of this attempt that came meanwhile: run once ended


@dataclass
class TaskCounts:
    started: int = 0
    eager: int = 0
    echoed: int = 0
    resumed: int = 0  # attempts a restored state awaited, started with no task record
    running: int = 0
    peak_running: int = 0


class TaskRunner:
    """Runs step attempts; see the module docstring.

    Args:
        max_in_flight: agents running at once.
        executor: runs one attempt and reports its result (``Attempts`` with the process's context).
        gate: asked after a task got its slot and before its agent starts (may it still run here?), and
            when its result is in (is the partition still ours to decide it?).
        results: where a result goes with the task's source and its pending records: the intake
            (``Returns``) of a deciding worker, the results topic of a pool's executor.
        checkpoint: settles the records answered with no decision of their own (see ``echo``, and an
            attempt not started because it was decided meanwhile).
        errors: told of a bug in the runner itself (never an agent's failure, which is a result).
        limits: what a task waits for before it takes its slot and holds until it finishes (the step
            and model limits of ``streams.throttle``; None: nothing); a task waiting for it does not count
            against ``max_in_flight`` in :meth:`room`, and at most ``max_waiting`` do before ``room`` waits.
    """

    def __init__(
        self,
        max_in_flight: int,
        executor: Executor,
        gate: Admission,
        results: ResultSink,
        checkpoint: Checkpoint,
        errors: Failures,
        limits: Limits | None = None,
        max_waiting: int = 0,
    ) -> None:
        self._limits, self._max_waiting, self._waiting = limits, max_waiting, 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._limit = max_in_flight
        self._executor, self._gate, self._results = executor, gate, results
        self._checkpoint, self._errors = checkpoint, errors
        self._running: dict[str, _Running] = {}  # idempotency key -> an attempt executing here
        self._settled: dict[str, int] = {}  # idempotency key -> partition: eager, decided, record unread
        self._room = asyncio.Event()
        self._room.set()
        self.counts = TaskCounts()

    def __contains__(self, idempotency_key: object) -> bool:
        return idempotency_key in self._running

    def __len__(self) -> int:
        return len(self._running)

    async def room(self) -> None:
        """Wait until fewer than ``max_in_flight`` tasks are held here (the intake's backpressure)."""
        while len(self._running) - self._waiting >= self._limit or self._waiting >= self._max_waiting > 0:
            self._room.clear()
            await self._room.wait()

    def echo(self, idem: str, p: int, pending: Pending) -> bool:
        """Is this task record an attempt running or decided here? Then it finishes with that attempt's
        decision (settled at once, if that decision is made already)."""
        running = self._running.get(idem)
        if running is not None and running.partition == p and not running.cancelled:
            self.counts.echoed += running.eager and not running.record_seen
            running.record_seen = True
            running.pending.append(pending)
            return True
        if self._settled.get(idem) == p:  # an eager task whose result is decided already
            del self._settled[idem]
            self.counts.echoed += 1
            self._checkpoint.settled([pending])
            return True
        return False

    def start(
        self,
        p: int,
        task: StepTask,
        source: Source,
        *,
        eager: bool,
        pending: list[Pending],
        recorded: bool = True,
    ) -> asyncio.Task[None] | None:
        """Run ``task`` unless that attempt already runs here; returns what runs it (done once decided).

        ``recorded``: a task record of this attempt was written (an eager task's is echoed, see ``echo``).
        An attempt cancelled here that has not ended yet (``cancel_now``; an agent in a synchronous tool
        ends only when the tool returns) starts again once it has ended: a resume after a retake, with no
        task record to bring it back later, is not lost.
        """
        idem = task.idempotency_key
        held = self._running.get(idem)
        if held is not None:
            if held.cancelled:
                held.again = functools.partial(
                    self.start, p, task, source, eager=eager, pending=pending, recorded=recorded
                )
            return None
        self.counts.started += 1
        self.counts.eager += eager
        seen = not (eager and recorded)  # no record to wait for: nothing is settled after the decision
        running = self._running[idem] = _Running(p, eager=eager, record_seen=seen, pending=pending)
        running.task = asyncio.create_task(self._run(p, source, task, idem))
        running.task.add_done_callback(functools.partial(self._ended, idem, running))
        return running.task

    def _ended(self, idem: str, running: _Running, _: asyncio.Task[None]) -> None:
        """Forget an attempt once its task ended, however it ended: decided (``_run`` took it already),
        dropped, failed, cancelled, even before its first step (``cancel`` in the same loop iteration as
        ``start``, which never enters ``_run``); left behind, it would make every later ``start`` of that
        attempt here a no-op. The one place an attempt is forgotten; a later start of it is kept, and one
        that came while it was cancelled and winding down (``start``) starts now."""
        if self._running.get(idem) is running:
            del self._running[idem]
            if running.again is not None:
                running.again()
        self._room.set()

    def start_eager(
        self,
        p: int,
        tasks: list[tuple[Out, StepTask]],
        unrecorded: frozenset[str] = frozenset(),
    ) -> list[asyncio.Task[None]]:
        """Start the tasks of a decision this worker made (their runs await them), unless read back and run
        already (eager); those on an ``unrecorded`` step topic were not written there."""
        started = []
        for out, task in tasks:
            source = LocalSource(out.topic, p, out.key or b"", out.value_or_encode(), out.headers)
            recorded = out.topic not in unrecorded
            running = self.start(p, task, source, eager=True, pending=[], recorded=recorded)
            if running is not None:
                started.append(running)
        return started

    def resume(self, p: int, tasks: list[tuple[Out, StepTask]]) -> int:
        """Start the attempts a restored state of ``p`` awaits that have no task record and do not run here
        yet (``streams.local.Resumption``); returns how many started."""
        n = 0
        for out, task in tasks:
            source = LocalSource(out.topic, p, out.key or b"", out.value_or_encode(), out.headers)
            started = self.start(p, task, source, eager=False, pending=[])
            held = self._running.get(task.idempotency_key)
            n += started is not None or (held is not None and held.again is not None)  # or once it ended
        self.counts.resumed += n
        return n

    async def cancel(self, parts: set[int]) -> None:
        """Cancel the attempts of ``parts`` and wait until they stopped (their records are re-delivered);
        a start of one that came before this cancel is dropped with it."""
        doomed = [r.task for r in self._stopping(parts) if r.task is not None]
        for t in doomed:
            t.cancel()
        for t in doomed:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def cancel_now(self, p: int) -> None:
        """Cancel the attempts of ``p`` without waiting (from a synchronous callback)."""
        for r in self._stopping({p}):
            if r.task is not None:
                r.task.cancel()

    def _stopping(self, parts: set[int]) -> list[_Running]:
        """The attempts of ``parts``, marked cancelled: until they end, a start of one waits for its end."""
        doomed = [r for r in self._running.values() if r.partition in parts]
        for r in doomed:
            r.cancelled, r.again = True, None
        return doomed

    def forget(self, p: int) -> None:
        """Drop what is remembered of ``p``'s settled eager tasks (the partition is gone)."""
        self._settled = {k: q for k, q in self._settled.items() if q != p}

    @contextlib.asynccontextmanager
    async def _waited(self, hold: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
        self._waiting += 1
        waiting = True
        try:
            async with hold:
                self._waiting -= 1
                waiting = False
                self._room.set()
                yield
        finally:
            self._waiting -= waiting

    async def _run(self, p: int, source: Source, task: StepTask, idem: str) -> None:
        try:
            hold = self._limits.hold(task) if self._limits is not None else None
            async with self._waited(hold) if hold is not None else _FREE, self._slots:
                if not await self._gate.admit(p, task):
                    log.info("attempt %s not started: partition %d not ours, or not awaited there", idem, p)
                    running = self._running.pop(idem)
                    if await self._gate.accept(p):  # decided meanwhile (a copy ran): its records are answered
                        self._checkpoint.settled(running.pending)
                    return
                c = self.counts
                c.running += 1
                c.peak_running = max(c.peak_running, c.running)
                try:
                    result = await self._executor.execute(task)
                finally:
                    c.running -= 1
            if not await self._gate.accept(p):
                log.info("dropping result of %s: partition %d no longer owned", idem, p)
                return
            running = self._running.pop(idem)
            if running.eager and not running.record_seen:
                self._settled[idem] = p
            self._results.result(p, task, result, source, running.pending)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._errors.fail(exc)

"""The ports of the shell's rooms: what each needs from the others, by name and type.

A room is given its ports in its constructor, so reading ``Worker.__init__`` (or ``PoolExecutor``'s)
shows the whole pipeline: intake -> decide -> publish -> commit, and a step's result back to intake.
Each port is a small ``Protocol``; a room implements the ones it serves by having those methods.
"""

from __future__ import annotations

from asyncio import Future
from collections.abc import Sequence
from typing import Protocol

from aiokafka import ConsumerRecord

from calmrun.streams.checkpoint import Pending
from calmrun.streams.records import Out
from calmrun.workflow.events import StepResult, StepTask


class Source(Protocol):
    """Where a task came from, for a dead-letter record: a consumed record or a local one."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]]: ...


class Failures(Protocol):
    """Where a room reports what stops the process (a bug, a writer failed): ``Runtime.fail``."""

    def fail(self, exc: BaseException) -> None: ...


class Losses(Protocol):
    """Told once when a writer fails (fenced by a new owner, its producer broken, or worse), with the
    partitions it wrote for: their owner decides what it means (``streams.partitions``, ``streams.pool``)."""

    def lost(self, parts: set[int], exc: BaseException) -> None: ...


class GroupWriters(Protocol):
    """Whose writers the group knows (the assignor, ``streams.versions``): this member's writer's
    transactional id (``txn``), and the ids its last assignment said the members write under
    (``group_txns``; None: it said nothing, its leader is of an earlier calmrun)."""

    @property
    def txn(self) -> str: ...

    @property
    def group_txns(self) -> frozenset[str] | None: ...


class Known(Protocol):
    """Is a run already held here (``streams.ownership``)? A duplicate request gets no fresh stamp."""

    def known(self, run_id: str) -> bool: ...


class Owned(Protocol):
    """The partitions owned now, as a room that only watches reads them (``streams.brokers``)."""

    @property
    def owned(self) -> set[int]: ...


class Executor(Protocol):
    """Runs one attempt's agent and gives its result (an agent's failure is a result too)."""

    async def execute(self, task: StepTask) -> StepResult: ...


class Admission(Protocol):
    """Asked by the task runner before an agent starts and when its result is in."""

    async def admit(self, p: int, task: StepTask) -> bool:
        """May ``task`` start now (its partition still ours after any pause, the attempt still awaited)?"""
        ...

    async def accept(self, p: int) -> bool:
        """Is ``p`` ours to decide (waiting out a rebalance or a stall check first)?"""
        ...


class ResultSink(Protocol):
    """Where a step's result goes: decided by its owner (worker) or written to the results topic (pool)."""

    def result(
        self, p: int, task: StepTask, result: StepResult, source: Source, pending: Sequence[Pending]
    ) -> None: ...


class Starts(Protocol):
    """Starts the tasks of a decision here (eager execution): once it is committed, or before (``committed``
    False) where a crash can only repeat that decision; returns what it started (each done once decided)."""

    def start(self, p: int, tasks: list[tuple[Out, StepTask]], committed: bool) -> list[Future[None]]: ...


class Unrecorded(Protocol):
    """Which step topics' tasks a decision made now does not write (``streams.local.Recording``)."""

    @property
    def unrecorded(self) -> frozenset[str]: ...


class Running(Protocol):
    """The attempts running here, as a change of ownership needs them: cancelled, forgotten."""

    async def cancel(self, parts: set[int]) -> None: ...

    def cancel_now(self, p: int) -> None: ...

    def forget(self, p: int) -> None: ...


class Parking(Protocol):
    """Parks a record that cannot be processed at all, with its cause (finishing ``pending`` if given)."""

    def park(
        self,
        rec: ConsumerRecord[bytes, bytes],
        exc: Exception,
        workflow: str | None,
        pending: Pending | None,
    ) -> None: ...


class Takeover(Protocol):
    """Told once partitions are newly owned (restored, positioned): held commands, resumed attempts."""

    def taken(self, new: set[int]) -> None: ...


class Returns:
    """The pipeline's one way back: a step's result returns to the intake as its input.

    The task runner needs it before the intake exists (the intake starts tasks), so it is made first and
    the intake, as it is built, opens it to itself; a result before that is a bug.
    """

    def __init__(self) -> None:
        self._to: ResultSink | None = None

    def open(self, to: ResultSink) -> None:
        """Send results to ``to`` from now on (once, by the intake's constructor)."""
        assert self._to is None, "the returns are the intake's"
        self._to = to

    def result(
        self, p: int, task: StepTask, result: StepResult, source: Source, pending: Sequence[Pending]
    ) -> None:
        assert self._to is not None, "a result before the intake was built"
        self._to.result(p, task, result, source, pending)

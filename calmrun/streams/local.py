"""The steps a deciding worker runs itself: how they run, started eagerly from its decisions, or again on a
takeover.

``LocalExecutor``: the task runner's ``Executor`` port, ``Attempts`` with the run's state for redaction.

``EagerStarts``: the tasks of a decision start here once it is committed, or before where a crash can only
repeat that decision (``streams.deciding``); a pool's steps, tasks running here already (read back) and
attempts the run no longer awaits are left out. ``Recording`` says when these steps write no task record
(``worker.task_records``: off, or ``auto`` while every member of the group resumes); after a crash or a
rebalance, ``Resumption`` has the new owner start the attempts its restored runs await (a previous owner may
have written no record). Each is rebuilt from the state (``awaited_tasks``: same attempt, key and input) and
is not a first run (its journal is read). An attempt waiting for its retry is not in flight: its timer
issues it. A run pinned to a version not served here waits, as its inputs do (``streams.versions``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Sequence

from calmrun.kafka.topics import Topics, partition_for
from calmrun.redact import Redactor
from calmrun.settings import WorkerSettings
from calmrun.streams.attempts import Attempts
from calmrun.streams.ownership import Ownership
from calmrun.streams.records import Out, task_out
from calmrun.streams.shared import Shared
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.versions import Pinning, VersionAssignor
from calmrun.workflow.decider import awaited_tasks
from calmrun.workflow.events import StepResult, StepTask
from calmrun.workflow.registry import Pin

log = logging.getLogger("calmrun.worker")


class LocalExecutor:
    """Runs an attempt of a run owned here: its agent sees secrets redacted per the run's state."""

    def __init__(self, attempts: Attempts, redactor: Redactor, ownership: Ownership) -> None:
        self._attempts, self._redactor, self._own = attempts, redactor, ownership

    async def execute(self, task: StepTask) -> StepResult:
        state = self._own.state(partition_for(task.run_id, self._own.n), task.run_id)
        return await self._attempts.run(task, functools.partial(self._redactor.text, state=state))


def resumes_from_states(mode: bool | str, eager: bool) -> bool:
    """Does a worker with ``worker.task_records`` ``mode`` start, on a takeover, the attempts its restored
    states await (what it publishes to its group, and what ``Recording.resumes`` covers)?"""
    return eager and mode is not True


class Recording:
    """Which step topics of the steps run here get no task record, decision by decision.

    ``worker.task_records``: ``True`` writes every task; ``False`` none (the new owner resumes from the
    state); ``auto`` none while the last assignment said that every member of the group resumes from states
    (``VersionAssignor.group_resumes``: an older worker, which resumes nothing and would wait for the
    record, says nothing, so its group keeps writing them). Without eager starts every task is written.

    Args:
        local: the step topics whose tasks this worker executes.
        assignor: this worker's assignor class (what the group said at the last assignment).
    """

    def __init__(
        self, local: frozenset[str], mode: bool | str, eager: bool, assignor: type[VersionAssignor]
    ) -> None:
        self.local, self._mode, self._eager, self.assignor = local, mode, eager, assignor

    @classmethod
    def of(
        cls,
        w: WorkerSettings,
        topics: Topics,
        inputs: Sequence[str],
        serves: Iterable[Pin],
        executes: bool,
        txn: str = "",
    ) -> Recording:
        """A deciding worker's: its step topics are its ``inputs`` but requests and results, and its assignor
        says to the group the versions it ``serves``, whether it resumes from states (only one that
        ``executes`` the default pool's steps can) and its writer's transactional id ``txn``."""
        resumes = executes and resumes_from_states(w.task_records, w.eager)
        local = frozenset(inputs) - {topics.requests, topics.results}
        return cls(local, w.task_records, w.eager, VersionAssignor.for_worker(serves, resumes, txn))

    @property
    def resumes(self) -> frozenset[str]:
        """The step topics whose awaited attempts a takeover starts from the restored states."""
        return self.local if resumes_from_states(self._mode, self._eager) else frozenset()

    @property
    def unrecorded(self) -> frozenset[str]:
        """The step topics whose tasks a decision made now does not write."""
        if self._mode == "auto":
            return self.resumes if self.assignor.group_resumes else frozenset()
        return self.resumes


class EagerStarts:
    """Starts the tasks of a decision on this worker; see the module docstring.

    Args:
        recording: the step topics whose tasks this worker executes, and which have their tasks written now.
        stopped: set when the worker stops or fails: nothing starts after.
    """

    def __init__(
        self,
        ownership: Ownership,
        tasks: TaskRunner,
        attempts: Attempts,
        recording: Recording,
        stopped: asyncio.Event,
    ) -> None:
        self._own, self._tasks, self._attempts = ownership, tasks, attempts
        self._recording, self._stopped = recording, stopped

    def start(self, p: int, tasks: list[tuple[Out, StepTask]], committed: bool) -> list[asyncio.Future[None]]:
        """Start the tasks of a decision: once it is committed, or before (``committed`` False) where a
        crash can only repeat that decision."""
        if p not in self._own.owned or self._stopped.is_set():
            return []
        # not a pool's, not already running here (read back before this callback), still awaited
        mine = [
            (out, task)
            for out, task in tasks
            if out.topic in self._recording.local
            and task.idempotency_key not in self._tasks
            and self._own.awaited(p, task)
        ]
        if committed:  # a first run whose decision is committed never ran anywhere: its journal is empty
            self._attempts.first_runs((t, self._own.state(p, t.run_id)) for _, t in mine)
        return list(self._tasks.start_eager(p, mine, self._recording.unrecorded))


class Resumption:
    """Starts the unrecorded attempts of partitions just taken over; see the module docstring.

    Args:
        recording: which step topics' attempts are resumed (``Recording.resumes``; none: nothing is).
        stopped: set when the worker stops or fails: nothing starts after.
    """

    def __init__(
        self,
        shared: Shared,
        pins: Pinning,
        tasks: TaskRunner,
        recording: Recording,
        stopped: asyncio.Event,
    ) -> None:
        s = shared
        self._own, self._workflows, self._pins, self._tasks = s.ownership, s.workflows, pins, tasks
        self._topics, self._codec, self._recording, self._stopped = s.topics, s.codec, recording, stopped

    def taken(self, parts: set[int]) -> None:
        """Start the attempts that the runs of ``parts``, just taken over, await and that have no task record
        (steps run here, ``Recording.resumes``), unless they run here already: a previous owner may have
        written no task record for them."""
        resumes = self._recording.resumes
        if not resumes or self._stopped.is_set():
            return
        resumed = 0
        for p in sorted(parts & self._own.owned):
            table = self._own.runs.get(p)
            for _, state in table.live() if table is not None else ():
                wf = self._workflows.pinned(state.workflow, state.version, state.digest)
                if wf is None or not self._pins.serves(state):
                    continue
                awaited = awaited_tasks(wf, state)
                mine = [t for t in awaited if self._topics.step(t.workflow, t.step) in resumes]
                tasks = [(task_out(self._topics, self._codec, p, t, unsent=resumes), t) for t in mine]
                resumed += self._tasks.resume(p, tasks)
        log.info("partitions %s taken over: %d attempts resumed from states", sorted(parts), resumed)

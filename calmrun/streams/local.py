"""The steps a deciding worker runs itself: how they run, started eagerly from its decisions, or again on a
takeover.

``LocalExecutor``: the task runner's ``Executor`` port, ``Attempts`` with the run's state for redaction.

``EagerStarts``: the tasks of a decision start here once it is committed, or before where a crash can only
repeat that decision (``streams.deciding``); a pool's steps, tasks running here already (read back) and
attempts the run no longer awaits are left out. With ``worker.task_records`` off (and eager starts) these
steps write no task record; after a crash or a rebalance, ``Resumption`` has the new owner start the
attempts its restored runs await. Each is rebuilt from the state (``awaited_tasks``: same attempt, key and
input) and is not a first run (its journal is read). An attempt waiting for its retry is not in flight: its
timer issues it. A run pinned to a version not served here waits, as its inputs do (``streams.versions``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Set

from calmrun.kafka.topics import partition_for
from calmrun.redact import Redactor
from calmrun.streams.attempts import Attempts
from calmrun.streams.ownership import Ownership
from calmrun.streams.records import Out, task_out
from calmrun.streams.shared import Shared
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.versions import Pinning
from calmrun.workflow.decider import awaited_tasks
from calmrun.workflow.events import StepResult, StepTask

log = logging.getLogger("calmrun.worker")


class LocalExecutor:
    """Runs an attempt of a run owned here: its agent sees secrets redacted per the run's state."""

    def __init__(self, attempts: Attempts, redactor: Redactor, ownership: Ownership) -> None:
        self._attempts, self._redactor, self._own = attempts, redactor, ownership

    async def execute(self, task: StepTask) -> StepResult:
        state = self._own.state(partition_for(task.run_id, self._own.n), task.run_id)
        return await self._attempts.run(task, functools.partial(self._redactor.text, state=state))


class EagerStarts:
    """Starts the tasks of a decision on this worker; see the module docstring.

    Args:
        local: the step topics whose tasks this worker executes.
        unrecorded: those of them whose tasks are not written.
        stopped: set when the worker stops or fails: nothing starts after.
    """

    def __init__(
        self,
        ownership: Ownership,
        tasks: TaskRunner,
        attempts: Attempts,
        local: Set[str],
        unrecorded: frozenset[str],
        stopped: asyncio.Event,
    ) -> None:
        self._own, self._tasks, self._attempts = ownership, tasks, attempts
        self._local, self._unrecorded, self._stopped = local, unrecorded, stopped

    def start(self, p: int, tasks: list[tuple[Out, StepTask]], committed: bool) -> list[asyncio.Future[None]]:
        """Start the tasks of a decision: once it is committed, or before (``committed`` False) where a
        crash can only repeat that decision."""
        if p not in self._own.owned or self._stopped.is_set():
            return []
        # not a pool's, not already running here (read back before this callback), still awaited
        mine = [
            (out, task)
            for out, task in tasks
            if out.topic in self._local
            and task.idempotency_key not in self._tasks
            and self._own.awaited(p, task)
        ]
        if committed:  # a first run whose decision is committed never ran anywhere: its journal is empty
            self._attempts.first_runs((t, self._own.state(p, t.run_id)) for _, t in mine)
        return list(self._tasks.start_eager(p, mine, self._unrecorded))


class Resumption:
    """Starts the unrecorded attempts of partitions just taken over; see the module docstring.

    Args:
        unrecorded: the step topics whose tasks are not recorded (none: nothing is ever resumed).
        stopped: set when the worker stops or fails: nothing starts after.
    """

    def __init__(
        self,
        shared: Shared,
        pins: Pinning,
        tasks: TaskRunner,
        unrecorded: Set[str],
        stopped: asyncio.Event,
    ) -> None:
        s = shared
        self._own, self._workflows, self._pins, self._tasks = s.ownership, s.workflows, pins, tasks
        self._topics, self._codec, self._unrecorded, self._stopped = s.topics, s.codec, unrecorded, stopped

    def taken(self, parts: set[int]) -> None:
        """Start the attempts that the runs of ``parts``, just taken over, await and that have no task record
        (steps run here, ``worker.task_records`` off), unless they run here already."""
        if not self._unrecorded or self._stopped.is_set():
            return
        resumed = 0
        for p in sorted(parts & self._own.owned):
            table = self._own.runs.get(p)
            for _, state in table.live() if table is not None else ():
                wf = self._workflows.pinned(state.workflow, state.version, state.digest)
                if wf is None or not self._pins.serves(state):
                    continue
                awaited = awaited_tasks(wf, state)
                mine = [t for t in awaited if self._topics.step(t.workflow, t.step) in self._unrecorded]
                tasks = [(task_out(self._topics, self._codec, p, t), t) for t in mine]
                resumed += self._tasks.resume(p, tasks)
        log.info("partitions %s taken over: %d attempts resumed from states", sorted(parts), resumed)

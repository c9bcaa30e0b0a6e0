"""Resuming, on a takeover, the attempts that have no task record: started again from the restored states.

With ``worker.task_records`` off (and eager starts), the steps a deciding worker runs itself write no task
record (``streams.deciding``); after a crash or a rebalance, the new owner starts the attempts its restored
runs await. Each is rebuilt from the state (``awaited_tasks``: same attempt, key and input) and is not a
first run (its journal is read). An attempt waiting for its retry is not in flight: its timer issues it. A
run pinned to a version not served here waits, as its inputs do (``streams.versions``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set

from calmrun.kafka.topics import Topics
from calmrun.streams.partitions import Partitions
from calmrun.streams.records import task_out
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.versions import Pinning
from calmrun.wire.codec import RecordCodec
from calmrun.workflow.decider import awaited_tasks
from calmrun.workflow.registry import Definitions

log = logging.getLogger("calmrun.worker")


class Resumption:
    """Starts the unrecorded attempts of partitions just taken over; see the module docstring.

    Args:
        unrecorded: the step topics whose tasks are not recorded (none: nothing is ever resumed).
        stopped: set when the worker stops or fails: nothing starts after.
    """

    def __init__(
        self,
        parts: Partitions,
        workflows: Definitions,
        pins: Pinning,
        tasks: TaskRunner,
        topics: Topics,
        codec: RecordCodec,
        unrecorded: Set[str],
        stopped: asyncio.Event,
    ) -> None:
        self._parts, self._workflows, self._pins, self._tasks = parts, workflows, pins, tasks
        self._topics, self._codec, self._unrecorded, self._stopped = topics, codec, unrecorded, stopped

    def resume(self, parts: set[int]) -> None:
        """Start the attempts that the runs of ``parts``, just taken over, await and that have no task record
        (steps run here, ``worker.task_records`` off), unless they run here already."""
        if not self._unrecorded or self._stopped.is_set():
            return
        resumed = 0
        for p in sorted(parts & self._parts.owned):
            table = self._parts.runs.get(p)
            for _, state in table.live() if table is not None else ():
                wf = self._workflows.pinned(state.workflow, state.version, state.digest)
                if wf is None or not self._pins.serves(state):
                    continue
                tasks = [(task_out(self._topics, self._codec, p, t), t) for t in awaited_tasks(wf, state)]
                resumed += self._tasks.resume(p, [(o, t) for o, t in tasks if o.topic in self._unrecorded])
        log.info("partitions %s taken over: %d attempts resumed from states", sorted(parts), resumed)

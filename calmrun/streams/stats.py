"""What a deciding worker shows of itself: its rooms' counters, gauges and readiness, read now.

``Readout`` is the metrics' ``Measured`` port (``streams.metrics``) and what tests, the CLI and the bench
read through the worker (``Worker.stats``, ``owned``, ``runs``): it reads the rooms, and no room reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from calmrun.streams.metrics import Gauges
from calmrun.streams.readiness import Readiness, readiness

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

    from calmrun.kafka.topics import Topics
    from calmrun.settings import Settings
    from calmrun.streams.checkpoint import Checkpoint
    from calmrun.streams.deciding import DecisionCounts
    from calmrun.streams.gate import Gate
    from calmrun.streams.intake import IntakeCounts
    from calmrun.streams.runtable import RunTable
    from calmrun.streams.runtime import Runtime
    from calmrun.streams.shared import Shared
    from calmrun.streams.tasks import TaskCounts
    from calmrun.streams.throttle import Throttle
    from calmrun.streams.versions import Pinning
    from calmrun.workflow.registry import Definitions


@dataclass
class WorkerStats:
    """Counters a test or the CLI can read; Prometheus metrics mirror them (a snapshot of the rooms')."""

    requests: int = 0
    results: int = 0  # pooled steps' results read from the results topic
    tasks_started: int = 0
    tasks_eager: int = 0
    decisions_early: int = 0  # decisions whose tasks started before they committed (worker.early)
    tasks_echoed: int = 0
    tasks_resumed: int = 0  # attempts a restored state awaited, started with no task record
    tasks_skipped: int = 0
    decisions: int = 0
    ignored: int = 0
    poison: int = 0
    quarantined: int = 0
    completed: int = 0
    running: int = 0
    peak_running: int = 0
    peak_unacked: int = 0  # decisions submitted but not yet committed, at most (see max_unacked)
    restored_runs: int = 0
    restored_partitions: int = 0
    kept_partitions: int = 0  # partitions given back by a rebalance with their runs still in memory
    fenced: int = 0  # partitions lost because another worker took them over (their writes were refused)
    retaken: int = 0  # times this worker took its partitions over again because its writer's producer broke
    transactions: int = 0
    commits: int = 0  # transactions the worker's writer committed
    rejected: int = 0  # refused run requests answered under their run ID (streams.refusals)
    results_malformed: int = 0  # malformed results that failed the attempt they answer
    results_unknown_run: int = 0  # results for a run not known here: parked


class Readout:
    """One deciding worker's figures, read from its rooms when asked; see the module docstring.

    Args:
        worker: its lifecycle (failed, stopping), for the readiness.
        intake, tasks, decided: the rooms' counters; the gate (``peak_unacked``, ``uncommitted``) and the
            checkpoint (``transactions``) count too.
        pins, throttle: runs waiting for a version, and the limits' figures, for the gauges.
    """

    def __init__(
        self,
        shared: Shared,
        worker: Runtime,
        intake: IntakeCounts,
        tasks: TaskCounts,
        decided: DecisionCounts,
        gate: Gate,
        checkpoint: Checkpoint,
        pins: Pinning,
        throttle: Throttle,
    ) -> None:
        self._shared, self._worker, self._own = shared, worker, shared.ownership
        self._intake, self._tasks, self._decided = intake, tasks, decided
        self._gate, self._checkpoint, self._pins, self._throttle = gate, checkpoint, pins, throttle

    @property
    def settings(self) -> Settings:
        return self._shared.settings

    @property
    def topics(self) -> Topics:
        return self._shared.topics

    @property
    def workflows(self) -> Definitions:
        return self._shared.workflows

    @property
    def owned(self) -> set[int]:
        """The partitions this worker owns now."""
        return self._own.owned

    @property
    def runs(self) -> dict[int, RunTable]:
        """The runs of the owned partitions."""
        return self._own.runs

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer (None before the worker joins), for its lag."""
        return self._own.consumer

    @property
    def uncommitted(self) -> int:
        """Decisions made and not yet committed (on all partitions)."""
        return self._gate.pending

    def gauges(self) -> Gauges:
        """What the worker's metrics show, now (``streams.metrics.Measured``)."""
        return Gauges.read(self.workflows, self.runs.values(), self._pins.waiting(), self._throttle)

    def readiness(self) -> Readiness:
        """Is the worker deciding yet (``streams.readiness``)."""
        return readiness(self._worker, self._own)

    @property
    def stats(self) -> WorkerStats:
        """The rooms' counters now: the intake's, the task runner's, the ownership's, the decisions', the
        gate's (``peak_unacked``, ``commits``) and the checkpoint's (``transactions``)."""
        intake, tasks, parts, decided = self._intake, self._tasks, self._own.counts, self._decided
        return WorkerStats(
            requests=intake.requests,
            results=intake.results,
            tasks_started=tasks.started,
            tasks_eager=tasks.eager,
            decisions_early=decided.early,
            tasks_echoed=tasks.echoed,
            tasks_resumed=tasks.resumed,
            tasks_skipped=intake.tasks_skipped,
            decisions=decided.decisions,
            ignored=decided.ignored,
            poison=intake.poison,
            quarantined=decided.quarantined,
            completed=decided.completed,
            running=tasks.running,
            peak_running=tasks.peak_running,
            peak_unacked=self._gate.peak,
            restored_runs=parts.restored_runs,
            restored_partitions=parts.restored_partitions,
            kept_partitions=parts.kept_partitions,
            fenced=parts.fenced,
            retaken=parts.retaken,
            transactions=self._checkpoint.transactions,
            commits=self._gate.commits,
            rejected=intake.rejected,
            results_malformed=intake.results_malformed,
            results_unknown_run=intake.results_unknown_run,
        )

"""What a worker counts: a snapshot of its rooms' counters, for tests, the CLI and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from calmrun.streams.checkpoint import Checkpoint
    from calmrun.streams.deciding import DecisionCounts
    from calmrun.streams.intake import IntakeCounts
    from calmrun.streams.ownership import PartitionCounts
    from calmrun.streams.tasks import TaskCounts
    from calmrun.streams.txn import Gate


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
    retaken: int = 0  # partitions this worker took over again because their producer broke
    transactions: int = 0
    rejected: int = 0  # refused run requests answered under their run ID (streams.refusals)
    results_malformed: int = 0  # malformed results that failed the attempt they answer
    results_unknown_run: int = 0  # results for a run not known here: parked


def snapshot(
    intake: IntakeCounts,
    tasks: TaskCounts,
    parts: PartitionCounts,
    decided: DecisionCounts,
    gate: Gate,
    cp: Checkpoint,
) -> WorkerStats:
    """One worker's counters, gathered from its rooms, the gate (``peak_unacked``) and the checkpoint
    (``transactions``)."""
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
        peak_unacked=gate.peak,
        restored_runs=parts.restored_runs,
        restored_partitions=parts.restored_partitions,
        kept_partitions=parts.kept_partitions,
        fenced=parts.fenced,
        retaken=parts.retaken,
        transactions=cp.transactions,
        rejected=intake.rejected,
        results_malformed=intake.results_malformed,
        results_unknown_run=intake.results_unknown_run,
    )

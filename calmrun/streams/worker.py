"""The deciding worker: the rooms of the shell over Kafka composed into one pipeline, run from start to stop.

Partition N of every calmrun topic belongs to one worker of the group (``streams.versions``): it holds those
runs' state, is its only writer, and executes their default-pool steps. The pipeline is intake -> decide
-> publish -> commit, a step's result returning to the intake; each room takes its ports in its constructor
(``streams.ports``), so ``__init__`` reads in that order. Effectively once: ``streams.checkpoint``,
``streams.txn``, ``streams.deciding``; the whole story is in ``docs/architecture.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.kafka.topics import Topics, ensure_topics
from calmrun.limits import check_served
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams.attempts import Attempts
from calmrun.streams.brokers import BrokerWatch
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.deciding import Deciding
from calmrun.streams.due import DueTimers
from calmrun.streams.gate import Gate
from calmrun.streams.intake import Intake
from calmrun.streams.local import EagerStarts, LocalExecutor, Recording, Resumption
from calmrun.streams.membership import Membership
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.ownership import Admission, Ownership, Stalls
from calmrun.streams.partitions import Partitions
from calmrun.streams.ports import Returns
from calmrun.streams.restore import Restore
from calmrun.streams.runtime import Loop, Runtime, wall_ms
from calmrun.streams.shared import Shared
from calmrun.streams.stamps import Stamps
from calmrun.streams.stats import Readout, WorkerStats
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.throttle import Throttle
from calmrun.streams.timers import Timers
from calmrun.streams.txn import kick_every, worker_transactional_id
from calmrun.streams.versions import Pinning, Released
from calmrun.tracing import tracing_for
from calmrun.wire.codec import wire_codec
from calmrun.workflow.definition import DEFAULT_POOL, WorkflowDef

log = logging.getLogger("calmrun.worker")

__all__ = ["Worker", "wall_ms"]


class Worker(Runtime):
    """Decides the runs of the partitions the group gives it, and runs their default-pool steps; use
    ``async with Worker(...)``, ``start()``/``stop()`` or ``run()`` as a process's main job. Read it through
    ``stats``, ``parts`` (what it owns now: ``owned``, ``runs``) and ``readout`` (``streams.stats``).

    Args:
        settings: Kafka, worker and model configuration.
        workflows: the definitions run here, several versions of one included (``streams.versions``).
        agents, models: resolve the steps' agent references and model aliases.
        clock: wall-clock milliseconds; time enters the decider only through the inputs it stamps.
        metrics: Prometheus metrics of this worker (``/metrics`` when ``settings.metrics.port``).
        stamps: what requests are stamped with; by default read from the cost aggregator's topics.
        pool: the pool whose steps it executes itself (``"default"``: those naming none, eagerly); ``None``
            decides only, reading every result from the results topic. Every worker of a group agrees.
    """

    def __init__(
        self,
        settings: Settings,
        workflows: Sequence[WorkflowDef],
        agents: AgentRegistry,
        models: ModelRegistry,
        *,
        clock: Callable[[], int] = wall_ms,
        metrics: WorkerMetrics | None = None,
        stamps: Stamps | None = None,
        pool: str | None = DEFAULT_POOL,
    ) -> None:
        super().__init__("worker", log, settings.worker.gc_threshold)
        self.settings, self.agents, self.models, self.clock = settings, agents, models, clock
        self.metrics, self.pool, w = metrics, pool, settings.worker
        wfs = self.workflows = check_served(workflows, settings)  # within limits, children served too
        t, codec = self.topics, self.codec = Topics(settings.kafka.prefix), wire_codec(settings.wire)
        self.input_topics = t.worker_inputs(list(wfs.values()), pool)
        # which tasks are written, and the assignor that says so (and the versions served) to the group
        txn = self.txn_id = worker_transactional_id(settings.group_id, w.instance_id)  # the writer's
        recording = Recording.of(w, t, self.input_topics, wfs.pins(), pool is not None, txn)
        self.assignor = recording.assignor
        self.members = Membership.deciding(settings, self.input_topics, self.assignor)  # restorer, beats
        # ownership: what is owned now, read by every room; changed only by partitions and restore
        own = self.parts = Ownership(self.members, settings.kafka.partitions)
        shared = Shared(settings, t, codec, wfs, own, Redactor(settings.redact), clock)
        stalls, stopped = Stalls(own, w.session_timeout_s), self._stopped
        self.stamps = stamps or Stamps(settings, wfs.values(), own)  # own: is a run known here
        checkpoint = Checkpoint()  # the one owner of "this input is finished"
        gate, timers = Gate(w.max_unacked), Timers()
        self.throttle = Throttle(settings.throttle, wfs.values(), models.aliases)
        self.tracing = tracing_for(settings, pool=pool)  # off unless settings.tracing.endpoint
        self.attempts = Attempts(settings, agents, models, self.throttle, clock, self.tracing, metrics)
        # tasks: agents running; a result returns to the intake, the pipeline's one way back
        returns, executor = Returns(), LocalExecutor(self.attempts, shared.redactor, own)
        admission, limits = Admission(own, stalls, stopped), (self.throttle, settings.throttle.max_waiting)
        tasks = self.tasks = TaskRunner(
            w.max_in_flight, executor, admission, returns, checkpoint, self, *limits
        )
        # decide: the records of a decision to its partition's next transaction; its tasks start here
        eager = EagerStarts(own, tasks, self.attempts, recording, stopped)
        decisions = self.decisions = Deciding(shared, timers, metrics, eager, recording, self.tracing)
        pins = self.pins = Pinning(shared, decisions, self.assignor)
        # intake: records fetched, and the results of the steps run here
        intake = self.intake = Intake(
            shared, stalls, checkpoint, gate, tasks, decisions, pins, self.stamps, returns, self
        )
        # partitions: rebalances, writers, fencing; a takeover releases held commands and resumes attempts
        self.restore = Restore(shared, checkpoint, intake)
        takeovers = Released(pins, intake), Resumption(shared, pins, tasks, recording, stopped)
        self.partitions = Partitions(
            shared, stalls, self.restore, checkpoint, gate, timers, tasks, takeovers, self, self.assignor
        )
        self.due = DueTimers(shared, timers, pins, decisions, tasks)
        # what it shows: counters, gauges, readiness (the metrics' port); no room reads it
        read = intake.counts, tasks.counts, decisions.counts, gate, checkpoint, pins, self.throttle
        self.readout, self._stalls, self._shared = Readout(shared, self, *read), stalls, shared

    @property
    def stats(self) -> WorkerStats:
        """The rooms' counters, now (``streams.stats.Readout``)."""
        return self.readout.stats

    # -- lifecycle: streams.runtime runs it ---------------------------------------------------------

    async def _open(self) -> list[tuple[str, Loop]]:
        """Create topics, join the group (restoring the assigned partitions' runs); the loops to run."""
        await ensure_topics(self.settings.kafka, self.workflows.values())
        await self.members.join(self.partitions)  # its clients start, its beats before the join
        if self.metrics is not None:
            await self.metrics.start(self.readout)
        await self.stamps.start()
        log.info("worker started: workflows %s, group %s", sorted(self.workflows), self.settings.group_id)
        brokers = BrokerWatch.of(self._shared, self.input_topics, self.txn_id, self.metrics)
        return [
            ("calmrun-poll", self.intake.run()),
            ("calmrun-timer", self.due.run()),
            ("calmrun-commit", kick_every(self.settings.worker.commit_interval_s, self.parts.writers)),
            ("calmrun-watch", self._stalls.watch()),
            ("calmrun-brokers", brokers.run()),
        ]

    async def _close(self) -> None:
        """Cancel running agents (their tasks are re-delivered), commit the decided, leave."""
        await self.tasks.cancel(set(range(self.parts.n)))
        await self.partitions.close()  # what is decided is committed even after a failure
        if self.metrics is not None:
            await self.metrics.stop()
        await asyncio.gather(self.stamps.stop(), self.attempts.close())
        await self.members.leave()  # beats until the writers are flushed: peers wait for the leave
        self.tracing.close()

"""The worker: composes the rooms of the shell over Kafka into one pipeline, and runs them from start to stop.

All calmrun topics are co-partitioned by run ID and consumed by one group whose assignor keeps them
co-partitioned (``streams.versions``), so partition N of every topic belongs to one worker: it holds the state
of those runs, executes their default-pool step tasks (a pooled step's result comes back on the results topic
from its executors, ``streams.pool``), and is the only writer of their state.

The pipeline is intake -> decide -> publish -> commit, a step's result coming back to the intake; each room
is given its ports (``streams.ports``) in its constructor, so the constructor below reads in that order (and
``docs/architecture.md`` draws it). Effectively once: everything is read ``read_committed``, and each
partition's decisions are written in Kafka transactions with the input offsets they finish
(``streams.checkpoint``, ``streams.txn``; a lazy input's offset may follow in a later one); a crash
before a result is committed runs the same attempt again under the same idempotency key
(``streams.deciding``, ``streams.local``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.kafka.connect import AUTHORIZATION_ERRORS, start_error
from calmrun.kafka.topics import Topics, ensure_topics
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams import brokers, clients
from calmrun.streams.attempts import Attempts
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.deciding import Deciding
from calmrun.streams.due import DueTimers
from calmrun.streams.intake import Intake
from calmrun.streams.liveness import Liveness
from calmrun.streams.local import EagerStarts, LocalExecutor, Recording, Resumption
from calmrun.streams.metrics import Gauges, WorkerMetrics
from calmrun.streams.ownership import Admission, Ownership, Stalls
from calmrun.streams.partitions import Partitions, Writers
from calmrun.streams.ports import Returns
from calmrun.streams.readiness import Readiness, readiness
from calmrun.streams.restore import Restore
from calmrun.streams.runtable import RunTable
from calmrun.streams.runtime import Loop, Runtime, wall_ms
from calmrun.streams.stamps import Stamps
from calmrun.streams.stats import WorkerStats, snapshot
from calmrun.streams.tasks import TaskRunner
from calmrun.streams.throttle import Throttle
from calmrun.streams.timers import Timers
from calmrun.streams.txn import Gate, kick_every
from calmrun.streams.versions import Pinning, Released, VersionAssignor
from calmrun.tracing import tracing_for
from calmrun.wire.codec import wire_codec
from calmrun.workflow.definition import DEFAULT_POOL, WorkflowDef
from calmrun.workflow.registry import Definitions, check_children

log = logging.getLogger("calmrun.worker")

__all__ = ["Worker", "wall_ms"]


class Worker(Runtime):
    """Runs the given workflows until stopped; use ``async with Worker(...)``, ``start()``/``stop()`` or
    ``run()`` as a process's main job.

    Args:
        settings: Kafka, worker and model configuration.
        workflows: the definitions this worker runs, several versions of a workflow included (each run is
            decided with the version it is pinned to; see ``streams.versions``).
        agents: resolves the agent references of the steps.
        models: resolves model aliases to pydantic-ai models.
        clock: wall-clock milliseconds; time enters the decider only through the inputs it stamps.
        metrics: Prometheus metrics of this worker (``/metrics`` when ``settings.metrics.port``).
        stamps: what requests are stamped with (tenant spend, planner figures); by default read from the
            cost aggregator's topics as the settings and workflows need.
        pool: the pool whose steps this worker executes itself (``"default"``: the steps that name no
            pool, eagerly); ``None`` decides only. Pooled steps are executed by ``PoolExecutor``s, whose
            results this worker reads from the results topic. Every worker of a group must agree.
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
        wfs = self.workflows = Definitions(check_workflow(wf, settings) for wf in workflows)
        check_children(wfs.values())  # child workflows served here, and in no circle
        resumes = pool is not None and w.eager and w.task_records is not True  # streams.local.Recording
        self.assignor = VersionAssignor.for_worker(wfs.pins(), resumes)
        t, codec = self.topics, self.codec = Topics(settings.kafka.prefix), wire_codec(settings.wire)
        self.redactor = redactor = Redactor(settings.redact)
        steps = t.step_topics(wfs.values(), pool) if pool is not None else []
        local = frozenset(steps)  # step topics whose tasks this worker executes (every version's, once)
        recording = Recording(local, w.task_records, w.eager, self.assignor)  # which tasks are written
        pooled = pool is None or any(s.pool != pool for wf in wfs.values() for s in wf.steps)
        results = [t.results] if pooled else []  # only a group with pools has results to read
        self.input_topics = [t.requests, *results, *dict.fromkeys(steps)]
        # ownership: what is owned now, read by every room; changed only by partitions and restore
        own = self.parts = Ownership(self.input_topics, settings.kafka.partitions)
        stalls, stopped = Stalls(own, w.session_timeout_s), self._stopped
        self.stamps = stamps or Stamps(settings, wfs.values(), own.known)
        self._checkpoint = checkpoint = Checkpoint()  # the one owner of "this input is finished"
        self._gate, timers = Gate(w.max_unacked), Timers()
        self.throttle = Throttle(settings.throttle, wfs.values(), models.aliases)
        self.tracing = tracing_for(settings, pool=pool)  # off unless settings.tracing.endpoint
        self.attempts = Attempts(settings, agents, models, self.throttle, clock, self.tracing, metrics)
        # tasks: agents running; a result returns to the intake, the pipeline's one way back
        returns, executor, admission = (
            Returns(),
            LocalExecutor(self.attempts, redactor, own),
            Admission(own, stalls, stopped),
        )
        limits = self.throttle, settings.throttle.max_waiting
        self.tasks = TaskRunner(w.max_in_flight, executor, admission, returns, checkpoint, self, *limits)
        # decide: the records of a decision to its partition's next transaction; its tasks start here
        eager = EagerStarts(own, self.tasks, self.attempts, local, recording, stopped)
        decisions = self.decisions = Deciding(
            settings, t, codec, own, timers, redactor, clock, metrics, eager, recording, self.tracing
        )
        self.pins = Pinning(wfs, t, own, decisions, self.assignor)
        # intake: records fetched, and the results of the steps run here
        self.intake = Intake(
            settings,
            t,
            codec,
            wfs,
            own,
            stalls,
            checkpoint,
            self._gate,
            self.tasks,
            decisions,
            self.pins,
            self.stamps,
            returns,
            self,
            clock,
            redactor.text,
        )
        # partitions: rebalances, writers, fencing; a takeover releases held commands and resumes attempts
        self.restore = Restore(t, codec, own, checkpoint, self.intake)
        writers = Writers(settings, checkpoint, self._gate)
        resumption = Resumption(own, wfs, self.pins, self.tasks, t, codec, recording, stopped)
        takeovers = Released(self.pins, self.intake), resumption
        self.partitions = Partitions(
            t, own, stalls, self.restore, writers, checkpoint, timers, self.tasks, takeovers, self
        )
        self.due = DueTimers(timers, own, self.pins, wfs, decisions, self.tasks, clock, w.timer_interval_s)
        self._stalls = stalls
        self.liveness: Liveness | None = None

    @property
    def owned(self) -> set[int]:
        """The partitions this worker owns now."""
        return self.parts.owned

    @property
    def runs(self) -> dict[int, RunTable]:
        """The runs of the owned partitions."""
        return self.parts.runs

    @property
    def stats(self) -> WorkerStats:
        """The rooms' counters, now."""
        self.decisions.counts.peak_unacked = self._gate.peak
        self.decisions.counts.transactions = self._checkpoint.transactions
        return snapshot(self.intake.counts, self.tasks.counts, self.parts.counts, self.decisions.counts)

    @property
    def uncommitted(self) -> int:
        """Decisions made and not yet committed (on all partitions)."""
        return self._gate.pending

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer (None before ``start``)."""
        return self.parts.consumer

    def gauges(self) -> Gauges:
        """What this worker's metrics show, now (``streams.metrics.Measured``)."""
        return Gauges.read(self.workflows, self.runs.values(), self.pins.waiting(), self.throttle)

    def readiness(self) -> Readiness:
        """Is this worker deciding yet (``streams.readiness``)."""
        return readiness(self)

    # -- lifecycle: streams.runtime runs it ---------------------------------------------------------

    async def _open(self) -> list[tuple[str, Loop]]:
        """Create topics, join the group (restoring the assigned partitions' runs); the loops to run."""
        k = self.settings.kafka
        await ensure_topics(k, self.workflows.values())
        restorer = self.parts.restorer = clients.restorer(self.settings)
        consumer = self.parts.consumer = clients.group_consumer(self.settings, self.assignor)
        try:
            await restorer.start()
            if self.settings.worker.liveness.enabled:  # a killed peer leaves the group in about a second
                # before joining: its topic is created and its clients connect outside the first rebalance
                self.liveness = Liveness.of(self.settings, consumer)
                await self.liveness.start()
            consumer.subscribe(topics=self.input_topics, listener=self.partitions.listener())
            await consumer.start()
        except (KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:  # an ACL, TLS/SASL, or no broker
            if self.liveness is not None:  # started before the join: no beats for a worker that failed
                await self.liveness.stop()
                self.liveness = None
            await self.parts.close_clients()
            raise (await start_error(k, exc)) from exc
        if self.metrics is not None:
            await self.metrics.start(self)
        await self.stamps.start()
        log.info("worker started: workflows %s, group %s", sorted(self.workflows), self.settings.group_id)
        return [
            ("calmrun-poll", self.intake.run()),
            ("calmrun-timer", self.due.run()),
            ("calmrun-commit", kick_every(self.settings.worker.commit_interval_s, self.parts.writers)),
            ("calmrun-watch", self._stalls.watch()),
            ("calmrun-brokers", brokers.BrokerWatch.of(self).run()),
        ]

    async def _close(self) -> None:
        """Cancel running agents (their tasks are re-delivered), commit the decided, leave."""
        await self.tasks.cancel(set(range(self.parts.n)))
        await self.partitions.close()  # what is decided is committed even after a failure
        if self.metrics is not None:
            await self.metrics.stop()
        await asyncio.gather(self.stamps.stop(), self.attempts.close())
        if self.liveness is not None:  # beats until the writers are flushed: peers wait for the leave
            await self.liveness.stop()
        await self.parts.close_clients()
        self.tracing.close()

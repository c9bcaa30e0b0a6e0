"""A worker's Prometheus metrics: what its step attempts cost, how long they took, what is queued or stuck.

Counters and histograms are fed from the run events the worker writes (``observe``), so they say what the
audit log says: an event with ``seq <= 0`` is logged only and not counted, and a copy of an event already
observed here (same run and seq, re-decided after a rebalance) is not counted twice. Gauges are read when
Prometheus scrapes, from a snapshot the worker answers (``Measured.gauges``: runs in flight and steps
waiting from its run tables, runs waiting for a version, model aliases paused after a 429 and tasks that
waited for a limit from its throttle, ``calmrun.streams.throttle``); consumer lag from its consumer and DLQ
depth from the dead-letter topics' offsets are refreshed every ``refresh_s``. The metrics read the worker
only through the ``Measured`` port it passes to ``start`` (``streams.stats.Readout``): this module does not
import the worker.

Labels are bounded by the configuration (workflow, step, agent, model alias, tenant, status, direction,
topic); run IDs never become labels. Metrics live in the ``CollectorRegistry`` passed in, never in the
process-global default registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import Topics
from calmrun.settings import Settings
from calmrun.streams.runtable import RunTable
from calmrun.streams.throttle import Throttle
from calmrun.workflow.definition import AgentStep
from calmrun.workflow.events import RunEvent
from calmrun.workflow.registry import Definitions, Pin

if TYPE_CHECKING:
    from calmrun.streams.readiness import Readiness

log = logging.getLogger("calmrun.metrics")

STEP_LABELS = ("workflow", "step", "agent", "model", "tenant")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TERMINAL = {
    "run.completed": "completed",
    "run.quarantined": "quarantined",
    "run.over_budget": "over_budget",
    "run.refused": "refused",
    "run.cancelled": "cancelled",
    "run.rejected": "rejected",
}
SEEN_RUNS = 100_000
"""Runs whose last observed seq is remembered (LRU) to drop re-decided copies; memory, not labels."""


@dataclass(frozen=True)
class Gauges:
    """What the gauges show, read from a worker at one moment (``Measured.gauges``)."""

    in_flight: Mapping[str, int]  # workflow -> runs not yet terminal (every workflow served, 0 included)
    waiting: Mapping[tuple[str, str], int]  # (workflow, step) -> approval and wait steps waiting
    unserved: Mapping[Pin, int]  # runs pinned to a version not served here
    paused: Mapping[str, float]  # model alias -> seconds left of its pause after a 429
    pauses: Mapping[str, int]  # model alias -> 429s that paused it
    waits: Mapping[tuple[str, str], int]  # (limit, name) -> tasks that waited for it
    waited_s: Mapping[tuple[str, str], float]  # (limit, name) -> seconds waited

    @classmethod
    def read(
        cls,
        workflows: Iterable[str],
        runs: Iterable[RunTable],
        unserved: Mapping[Pin, int],
        throttle: Throttle,
    ) -> Gauges:
        """Count the live runs of ``runs`` and copy the throttle's figures."""
        in_flight: dict[str, int] = {name: 0 for name in workflows}
        waiting: dict[tuple[str, str], int] = {}
        for table in list(runs):
            for _, state in table.live():  # a finished run is not live
                in_flight[state.workflow] = in_flight.get(state.workflow, 0) + 1
                for step, st in state.steps.items():
                    if st.status == "waiting":
                        waiting[(state.workflow, step)] = waiting.get((state.workflow, step), 0) + 1
        c = throttle.counts
        return cls(
            in_flight,
            waiting,
            dict(unserved),
            throttle.paused(),
            dict(c.pauses),
            dict(c.waits),
            dict(c.waited_s),
        )


class Measured(Protocol):
    """The port the metrics read a worker through (the worker passes its ``streams.stats.Readout``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def topics(self) -> Topics: ...

    @property
    def workflows(self) -> Definitions: ...

    @property
    def owned(self) -> set[int]:
        """The partitions owned now (DLQ depth is counted over them)."""

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer, for its lag (None before start)."""

    def gauges(self) -> Gauges:
        """The snapshot the gauges show, now (called from the metrics server's thread)."""

    def readiness(self) -> Readiness:
        """Is it ready to decide (``/ready``; called on the worker's event loop)."""


class WorkerMetrics:
    """Prometheus metrics of one worker.

    Args:
        registry: where the metrics are registered (a fresh ``CollectorRegistry`` per worker).
        agents: (workflow, step, kind) -> agent name, for the ``agent`` label; ``bind`` fills it from the
            worker's workflows.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        agents: dict[tuple[str, str, str], str] | None = None,
        *,
        refresh_s: float = 2.0,
    ) -> None:
        self.registry = registry
        self.agents = dict(agents or {})
        self.refresh_s = refresh_s
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._source: Measured | None = None
        self._dlq_depth: dict[str, int] = {}
        self._lag: dict[str, int] = {}
        self._server: Any = None
        self._thread: Any = None
        self._refresher: asyncio.Task[None] | None = None
        self.tokens = Counter(
            "calmrun_tokens",
            "Model tokens used by step attempts.",
            (*STEP_LABELS, "direction"),
            registry=registry,
        )
        self.cost = Counter(
            "calmrun_cost_usd", "Money spent by step attempts (USD).", STEP_LABELS, registry=registry
        )
        self.api_calls = Counter(
            "calmrun_api_calls", "Downstream API calls made by step attempts.", STEP_LABELS, registry=registry
        )
        self.model_requests = Counter(
            "calmrun_model_requests", "Model requests made by step attempts.", STEP_LABELS, registry=registry
        )
        self.steps = Counter(
            "calmrun_steps",
            "Step attempts by outcome (succeeded, failed, compensated, compensation_failed).",
            (*STEP_LABELS, "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "calmrun_step_latency_seconds",
            "Wall time of a step attempt.",
            STEP_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "calmrun_step_queue_wait_seconds",
            "Time from a step task being issued to its attempt starting.",
            STEP_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.runs = Counter(
            "calmrun_runs", "Runs that ended, by status.", ("workflow", "tenant", "status"), registry=registry
        )
        registry.register(_Gauges(self))

    # -- events -----------------------------------------------------------------------------------

    def observe(self, ev: RunEvent) -> None:
        """Count one event the worker is writing (call it for every event, in order)."""
        if ev.type == "run.rejected":  # a note (seq -1); workflow and tenant are any text a client sent
            self.runs.labels("", "", "rejected").inc()
            return
        if ev.seq <= 0:
            return
        last = self._seen.get(ev.run_id)
        if last is not None and ev.seq <= last:
            return  # a re-decided copy of an event observed already
        self._seen[ev.run_id] = ev.seq
        self._seen.move_to_end(ev.run_id)
        if len(self._seen) > SEEN_RUNS:
            self._seen.popitem(last=False)
        run_status = TERMINAL.get(ev.type)
        if run_status is not None:
            self.runs.labels(ev.workflow, ev.tenant, run_status).inc()
            return
        if ev.type not in ("step.succeeded", "step.failed") or ev.cost is None:
            return
        c = ev.cost
        kind = str(ev.data.get("kind", "run"))
        step = ev.step or ""
        agent = getattr(c, "agent", None) or self.agents.get((ev.workflow, step, kind), "")
        labels = (ev.workflow, step, agent, c.model or "", ev.tenant)
        ok = ev.type == "step.succeeded"
        status = (
            ("succeeded" if ok else "failed")
            if kind == "run"
            else ("compensated" if ok else "compensation_failed")
        )
        self.steps.labels(*labels, status).inc()
        if c.tokens_in:
            self.tokens.labels(*labels, "in").inc(c.tokens_in)
        if c.tokens_out:
            self.tokens.labels(*labels, "out").inc(c.tokens_out)
        if c.cost_usd:
            self.cost.labels(*labels).inc(float(c.cost_usd))
        if c.api_calls:
            self.api_calls.labels(*labels).inc(c.api_calls)
        if c.requests:
            self.model_requests.labels(*labels).inc(c.requests)
        self.latency.labels(*labels).observe(c.latency_ms / 1000)
        self.queue_wait.labels(*labels).observe(c.queue_wait_ms / 1000)

    # -- the worker -------------------------------------------------------------------------------

    def bind(self, worker: Measured) -> None:
        """Read gauges from ``worker`` and learn its agents (for the ``agent`` label)."""
        self._source = worker
        for wf in worker.workflows.values():
            for s in wf.steps:
                if isinstance(s, AgentStep) and s.agent:  # approval and wait steps run none
                    self.agents[(wf.name, s.name, "run")] = s.agent
                undo = s.compensation()
                if undo:
                    self.agents[(wf.name, s.name, "compensate")] = undo

    async def start(self, worker: Measured) -> None:
        """Bind to ``worker``, serve ``/metrics`` and ``/ready`` (``settings.metrics``; port 0: off)."""
        self.bind(worker)
        m = worker.settings.metrics
        if m.port:
            from calmrun.streams.readiness import asker, serve

            ask = asker(worker.readiness, asyncio.get_running_loop())
            self._server, self._thread = serve(m.host, m.port, self.registry, ask)
            log.info("metrics on http://%s:%d/metrics, readiness on /ready", m.host, m.port)
        self._refresher = asyncio.create_task(self._refresh_loop(), name="calmrun-metrics")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def _refresh_loop(self) -> None:
        from aiokafka.structs import TopicPartition

        worker = self._source
        assert worker is not None
        k = worker.settings.kafka
        consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            client_id=f"{k.client_id}-metrics",
            isolation_level="read_committed",
            **client_kwargs(k),
        )
        try:
            await consumer.start()
            names = {worker.topics.dlq(w): w for w in [*worker.workflows, "_invalid"]}
            while True:
                owned = sorted(worker.owned)
                tps = [TopicPartition(t, p) for t in names for p in owned]
                if tps:
                    try:
                        end = await consumer.end_offsets(tps)
                        start = await consumer.beginning_offsets(tps)
                        depth: dict[str, int] = {}
                        for tp in tps:
                            wf = names[tp.topic]
                            depth[wf] = depth.get(wf, 0) + end[tp] - start[tp]
                        self._dlq_depth = depth
                    except Exception as exc:  # a gauge goes stale; the worker goes on
                        log.warning("DLQ depth not refreshed: %r", exc)
                else:
                    self._dlq_depth = {}
                self._lag = await _consumer_lag(worker.consumer)
                await asyncio.sleep(self.refresh_s)
        finally:
            await consumer.stop()

    def _gauges(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily(
            "calmrun_runs_in_flight",
            "Runs not yet terminal in this worker's partitions.",
            labels=("workflow",),
        )
        lag = GaugeMetricFamily(
            "calmrun_consumer_lag", "Records not yet consumed by this worker, per topic.", labels=("topic",)
        )
        dlq = GaugeMetricFamily(
            "calmrun_dlq_depth",
            "Records in the dead-letter topics (this worker's partitions).",
            labels=("topic",),
        )
        waiting = GaugeMetricFamily(
            "calmrun_steps_waiting",
            "Approval and wait steps waiting for a person or a signal (this worker's partitions).",
            labels=("workflow", "step"),
        )
        unserved = GaugeMetricFamily(
            "calmrun_runs_waiting_version",
            "Runs in this worker's partitions pinned to a workflow version it does not serve (they wait).",
            labels=("workflow", "version", "digest"),
        )
        g = self._source.gauges() if self._source is not None else None
        if g is not None:
            for pin, n in sorted(g.unserved.items()):
                unserved.add_metric((pin.workflow, pin.version, pin.digest), n)
            for name, n in sorted(g.in_flight.items()):
                in_flight.add_metric((name,), n)
            for key, n in sorted(g.waiting.items()):
                waiting.add_metric(key, n)
            for topic, n in sorted(self._lag.items()):
                lag.add_metric((topic,), n)
            for wf, n in sorted(self._dlq_depth.items()):
                dlq.add_metric((wf,), n)
        return (in_flight, waiting, unserved, lag, dlq, *_throttle(g))


def _throttle(g: Gauges | None) -> tuple[Metric, ...]:
    paused = GaugeMetricFamily(
        "calmrun_model_paused_seconds",
        "Seconds left of a model alias's pause on this worker after the provider's rate limit (429).",
        labels=("alias",),
    )
    pauses = CounterMetricFamily(
        "calmrun_model_pauses", "Rate limits (429) that paused a model alias here.", labels=("alias",)
    )
    waits = CounterMetricFamily(
        "calmrun_throttle_waits",
        "Tasks that waited before their agent started, by limit (step, model, rate, paused) and name.",
        labels=("limit", "name"),
    )
    waited = CounterMetricFamily(
        "calmrun_throttle_wait_seconds", "Seconds tasks waited for a limit.", labels=("limit", "name")
    )
    if g is not None:
        for alias, left in sorted(g.paused.items()):
            paused.add_metric((alias,), left)
        for alias, n in sorted(g.pauses.items()):
            pauses.add_metric((alias,), n)
        for key, n in sorted(g.waits.items()):
            waits.add_metric(key, n)
            waited.add_metric(key, g.waited_s.get(key, 0.0))
    return (paused, pauses, waits, waited)


async def _consumer_lag(consumer: AIOKafkaConsumer | None) -> dict[str, int]:
    """Per topic: the group consumer's high watermark minus its position, over its assignment."""
    lag: dict[str, int] = {}
    if consumer is None:
        return lag
    for tp in list(consumer.assignment()):
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            pos = await consumer.position(tp)
        except Exception:  # revoked meanwhile: its lag is another worker's now
            continue
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - pos)
    return lag


class _Gauges(Collector):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics._gauges()

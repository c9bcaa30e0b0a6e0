"""A pool executor's Prometheus metrics, read from its counters when Prometheus scrapes.

What the executor did is also in the audit log (each result becomes the deciding worker's
``step.succeeded``/``step.failed`` event with its cost, counted by that worker's metrics); these say how
the pool itself is doing: tasks read, results committed, agents running, partitions owned, poison.
Labels: ``pool`` only. The metrics live in the registry passed in, never the process-global one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from calmrun.settings import MetricsSettings

log = logging.getLogger("calmrun.metrics")


@dataclass
class PoolCounts:
    tasks: int = 0  # task records read
    results: int = 0  # results committed
    poison: int = 0  # task records that could not be read, parked
    fenced: int = 0  # partitions lost to another executor's takeover


class Executing(Protocol):
    """The port the metrics read an executor through (it passes itself); read when Prometheus scrapes."""

    @property
    def counts(self) -> PoolCounts: ...

    @property
    def running(self) -> int:
        """Agents running now."""

    @property
    def owned(self) -> set[int]:
        """Step-topic partitions owned now."""


class PoolMetrics(Collector):
    """Serves ``/metrics`` of one executor (``settings.metrics``; port 0: registered, not served)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        pool: str,
        executor: Executing,
    ) -> None:
        self.pool, self._executor = pool, executor
        self.registry = registry
        self._server: Any = None
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        ex, labels = self._executor, [self.pool]
        c = ex.counts
        for name, doc, value in (
            ("calmrun_pool_tasks_read", "Task records read by this executor", c.tasks),
            ("calmrun_pool_results", "Results committed to the results topic", c.results),
            ("calmrun_pool_poison", "Task records that could not be read, parked in the DLQ", c.poison),
            ("calmrun_pool_fenced", "Partitions lost to another executor's takeover", c.fenced),
        ):
            counter = CounterMetricFamily(name, doc, labels=["pool"])
            counter.add_metric(labels, value)
            yield counter
        for name, doc, gauge_value in (
            ("calmrun_pool_tasks_running", "Agents running in this executor now", ex.running),
            ("calmrun_pool_partitions_owned", "Step-topic partitions this executor owns", len(ex.owned)),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["pool"])
            gauge.add_metric(labels, gauge_value)
            yield gauge

    def start(self, m: MetricsSettings) -> None:
        if m.port:
            from prometheus_client import start_http_server

            self._server, _ = start_http_server(m.port, addr=m.host, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", m.host, m.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

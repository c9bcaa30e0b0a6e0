"""A worker's gauges come from the snapshot it answers through the ``Measured`` port: no worker, no Kafka."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from calmrun.kafka.topics import Topics
from calmrun.settings import Settings
from calmrun.streams.metrics import Gauges, WorkerMetrics
from calmrun.streams.readiness import Readiness
from calmrun.workflow.registry import Definitions, Pin


class Measured:
    """A stand-in worker: the port's fields and one fixed snapshot."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.topics = Topics("t")
        self.workflows = Definitions([])
        self.owned: set[int] = {0}
        self.consumer: AIOKafkaConsumer | None = None

    def gauges(self) -> Gauges:
        return Gauges(
            in_flight={"wf": 2, "idle": 0},
            waiting={("wf", "gate"): 1},
            unserved={Pin("wf", "1", "abc"): 3},
            paused={"remote": 4.5},
            pauses={"remote": 1},
            waits={("model", "remote"): 2},
            waited_s={("model", "remote"): 0.25},
        )

    def readiness(self) -> Readiness:
        return Readiness(True, "ready")


def test_the_gauges_show_the_snapshot() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.bind(Measured())
    value = metrics.registry.get_sample_value
    assert value("calmrun_runs_in_flight", {"workflow": "wf"}) == 2
    assert value("calmrun_runs_in_flight", {"workflow": "idle"}) == 0
    assert value("calmrun_steps_waiting", {"workflow": "wf", "step": "gate"}) == 1
    assert value("calmrun_runs_waiting_version", {"workflow": "wf", "version": "1", "digest": "abc"}) == 3
    assert value("calmrun_model_paused_seconds", {"alias": "remote"}) == 4.5
    assert value("calmrun_model_pauses_total", {"alias": "remote"}) == 1
    assert value("calmrun_throttle_waits_total", {"limit": "model", "name": "remote"}) == 2
    assert value("calmrun_throttle_wait_seconds_total", {"limit": "model", "name": "remote"}) == 0.25


def test_an_unbound_metrics_object_shows_no_gauge_series() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    assert metrics.registry.get_sample_value("calmrun_runs_in_flight", {"workflow": "wf"}) is None

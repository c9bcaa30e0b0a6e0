"""Label cardinality stays bounded: 10,000 distinct runs add no series, and run IDs never become labels."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry

from calmrun.streams.metrics import WorkerMetrics
from calmrun.workflow.events import RunEvent, StepCost


def events(run_id: str, i: int) -> list[RunEvent]:
    base = {"run_id": run_id, "workflow": "wf", "tenant": f"t{i % 3}"}
    cost = StepCost(
        latency_ms=12.0,
        queue_wait_ms=3.0,
        tokens_in=100,
        tokens_out=10,
        requests=1,
        api_calls=1,
        model=("cheap", "smart")[i % 2],
        cost_usd=Decimal("0.0001"),
    )
    return [
        RunEvent(**base, seq=1, type="run.requested", at_ms=i),
        RunEvent(**base, seq=2, type="step.succeeded", at_ms=i, step="s1", attempt=1, cost=cost),
        RunEvent(**base, seq=3, type="step.failed", at_ms=i, step="s2", attempt=1, cost=cost),
        RunEvent(**base, seq=3, type="step.failed", at_ms=i, step="s2", attempt=1, cost=cost),  # a copy
        RunEvent(**base, seq=-1, type="input.ignored", at_ms=i, step="s2", attempt=1, cost=cost),
        RunEvent(**base, seq=4, type="run.completed", at_ms=i),
    ]


def series(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for m in registry.collect() for s in m.samples}


def test_ten_thousand_runs_add_no_series() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, {("wf", "s1", "run"): "a1", ("wf", "s2", "run"): "a2"})
    for i in range(100):
        for ev in events(f"run-{i}", i):
            metrics.observe(ev)
    before = series(registry)
    for i in range(100, 10_000):
        for ev in events(f"run-{i}", i):
            metrics.observe(ev)
    after = series(registry)
    assert after == before
    assert len(after) < 1000  # 2 steps x 2 models x 3 tenants x (counters, histogram buckets)
    values = {v for _, labels in after for _, v in labels}
    assert not any(v.startswith("run-") for v in values)
    # copies and logged-only events were not counted
    steps = {dict(labels).get("status"): 0 for _, labels in after}
    for m in registry.collect():
        for s in m.samples:
            if s.name == "calmrun_steps_total":
                steps[s.labels["status"]] += int(s.value)
            if s.name == "calmrun_runs_total":
                assert s.labels["status"] == "completed"
    assert steps["succeeded"] == 10_000 and steps["failed"] == 10_000

"""How current and how whole the cost table is: a record the consumer skipped is re-read, counted once,
logged and counted as a repair; lag and coverage on /metrics and in ``calmrun costs``."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition
from typer.testing import CliRunner

from calmrun.cli import app
from calmrun.costs.app import Aggregator, Record
from calmrun.costs.costtopics import ensure_cost_topics
from calmrun.costs.process import AggregatorProcess
from calmrun.costs.totals import read_current
from calmrun.localproc import free_port
from calmrun.settings import Settings
from tests.costs.test_costs_aggregator import produce, settings_for, workload
from tests.costs_oracle import counted, differences, read_events, recount


class SkipsOne(Aggregator):
    """An aggregator whose consumer loses one priced event once (what faust did after a restart)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.dropped: Record | None = None

    async def _poll(self, wait_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        batch = await super()._poll(wait_ms, max_records)
        if self.dropped is None:
            for records in batch.values():
                for i, rec in enumerate(records):
                    if i > 0 and b"step.succeeded" in (rec.value or b""):
                        self.dropped = records.pop(i)
                        return batch
        return batch


async def test_a_skipped_record_is_re_read_and_counted_once(
    broker: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    await produce(settings, workload(20))
    agg = SkipsOne(settings)
    stopping = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="calmrun.costs")
    task = asyncio.create_task(agg.run(stopping))
    try:
        table, cov = await read_current(settings, wait=True, wait_s=60)
        assert agg.dropped is not None
        assert cov.lag == 0
        assert not differences(counted(table), recount(await read_events(settings)))
        assert sum(table.repairs.values()) == 1
        assert agg.registry.get_sample_value("calmrun_costs_repairs_total") == 1
        d = agg.dropped
        assert f"repaired {d.topic}[{d.partition}]@{d.offset}" in caplog.text
        assert all(
            agg.registry.get_sample_value("calmrun_costs_lag_events", {"partition": str(p)}) == 0
            for p in agg.folds
        )
    finally:
        stopping.set()
        await task


async def test_costs_and_metrics_say_how_current_the_table_is(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    await produce(settings, workload(10))
    port = free_port()
    runner = CliRunner()
    common = ["--bootstrap", broker, "--prefix", prefix]
    with AggregatorProcess(settings, log=tmp_path / "agg.log", extra=["--metrics-port", str(port)]):
        res = await asyncio.to_thread(
            runner.invoke, app, ["costs", "--wait", *common], env={"COLUMNS": "200"}
        )
        assert res.exit_code == 0, res.output
        _, cov = await read_current(settings)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        )
    assert "cost by workflow" in res.stdout
    parts = " ".join(f"p{p}:{e}/{e}" for p, e in sorted(cov.end.items()))
    assert f"covers events offsets (covered/end) {parts}; lag 0 events" in res.stdout
    lags = [line for line in body.splitlines() if line.startswith("calmrun_costs_lag_events{")]
    assert len(lags) == 4 and all(line.endswith(" 0.0") for line in lags)
    covered = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("calmrun_costs_covered_offset{")
    }
    assert covered == {str(p): float(e) for p, e in cov.end.items()}


async def test_wait_says_when_no_aggregator_covers_the_events(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    await produce(settings, workload(2))
    res = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["costs", "--wait", "--wait-s", "2", "--bootstrap", broker, "--prefix", prefix],
    )
    assert res.exit_code != 0
    assert "events behind after 2s" in res.output and "calmrun costs-aggregator" in res.output

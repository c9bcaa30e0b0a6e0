"""A real Prometheus server scrapes a worker that ran a known workload: PromQL answers equal the aggregator's
table and the known totals. Needs the Debian package ``prometheus`` (``make tools`` installs it); the test
fails without it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic_ai.usage import RunUsage

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.cli.costs import batch_costs
from calmrun.client import Client
from calmrun.costs.process import AggregatorProcess
from calmrun.localproc import free_port
from calmrun.settings import Settings, load_settings
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, linear, ready

RUNS = 30
STEPS = 2


async def priced(ctx: StepContext, item: Item) -> Out:
    """Known usage per attempt: 100+n tokens in, 10 out, one model request, one payments call."""
    ctx.add_usage(RunUsage(input_tokens=100 + item.n, output_tokens=10, requests=1))
    ctx.count_api_call(kind="payments")
    return Out(n=item.n + 1)


def settings_for(broker: str, prefix: str, metrics_port: int) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        metrics={"host": "127.0.0.1", "port": metrics_port},
        models={"cheap": {"model": "test", "price_in_per_mtok": "1.5", "price_out_per_mtok": "3"}},
        prices={"api_calls": {"payments": "0.01"}},
        costs={"emit_interval_s": 0.2, "session_timeout_s": 6},
    )


def query(port: int, promql: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def poll_query(port: int, promql: str, want: float, wait_s: float = 60.0) -> float | None:
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    got: float | None = None
    while loop.time() < end:
        try:
            got = await asyncio.to_thread(query, port, promql)
        except OSError:
            got = None
        if got is not None and abs(got - want) <= 1e-9 * max(1.0, abs(want)):
            return got
        await asyncio.sleep(0.5)
    return got


def start_prometheus(tmp: Path, target_port: int, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make tools` (or apt-get install prometheus)")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: calmrun\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


async def test_prometheus_sees_the_table_totals(broker: str, prefix: str, tmp_path: Path) -> None:
    metrics_port, prom_port = free_port(), free_port()
    settings = settings_for(broker, prefix, metrics_port)
    wf = linear("priced", steps=STEPS, agent="priced", model="cheap")
    metrics = WorkerMetrics(CollectorRegistry())
    worker = Worker(
        settings, [wf], AgentRegistry({"priced": priced}), ModelRegistry(settings.models), metrics=metrics
    )
    prom = start_prometheus(tmp_path, metrics_port, prom_port)
    try:
        await worker.start()
        try:
            await ready(worker)
            async with Client(settings) as client:
                ids = await client.submit_many(
                    RunRequest(workflow="priced", run_id=f"r{i}", input={"n": i}, tenant=f"t{i % 2}")
                    for i in range(RUNS)
                )
                states = await client.wait_terminal(ids, wait_s=120)
            assert {s.status for s in states.values()} == {"completed"}

            # the known totals: run i's step k gets n = i + k - 1
            tokens_in = sum(100 + i + k for i in range(RUNS) for k in range(STEPS))
            attempts = RUNS * STEPS
            usd = (Decimal("1.5") * tokens_in + Decimal(3) * 10 * attempts) / 1_000_000 + Decimal(
                "0.01"
            ) * attempts

            with AggregatorProcess(settings, log=tmp_path / "agg.log"):
                table = await batch_costs(settings, wait_s=90)
            row = table.row("workflow", "priced")
            assert (row.attempts, row.tokens_in, row.tokens_out, row.api_calls) == (
                attempts,
                tokens_in,
                10 * attempts,
                attempts,
            )
            assert row.cost_usd == usd
            assert table.row("model", "cheap").cost_usd == usd
            assert table.row("tenant", "t0").cost_usd + table.row("tenant", "t1").cost_usd == usd

            checks = {
                'sum(calmrun_cost_usd_total{workflow="priced"})': float(usd),
                'sum(calmrun_tokens_total{direction="in"})': float(tokens_in),
                'sum(calmrun_tokens_total{direction="out"})': float(10 * attempts),
                "sum(calmrun_api_calls_total)": float(attempts),
                'sum(calmrun_steps_total{status="succeeded"})': float(attempts),
                'sum(calmrun_step_latency_seconds_count{model="cheap"})': float(attempts),
                'sum(calmrun_runs_total{status="completed"})': float(RUNS),
                'sum(calmrun_cost_usd_total{tenant="t0"})': float(table.row("tenant", "t0").cost_usd),
                'sum(calmrun_cost_usd_total{agent="priced",step="s2"})': float(
                    sum(r.cost_usd for r in table.rows("run")) - _step_cost(table, "s1")
                ),
            }
            got = {q: await poll_query(prom_port, q, want) for q, want in checks.items()}
            assert got == pytest.approx(checks, rel=1e-9), (tmp_path / "prometheus.log").read_text()[-2000:]
            in_flight = await poll_query(prom_port, 'sum(calmrun_runs_in_flight{workflow="priced"})', 0.0)
            assert in_flight == 0.0
            assert await poll_query(prom_port, "count(calmrun_dlq_depth)", 2.0) == 2.0  # priced + _invalid
        finally:
            await worker.stop()
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(timeout=30)


def _step_cost(table: object, step: str) -> Decimal:
    """Step s1's cost: the agent dimension lumps both steps (same agent), so compute it from the workload."""
    tokens_in = sum(100 + i for i in range(RUNS))
    return (Decimal("1.5") * tokens_in + Decimal(3) * 10 * RUNS) / 1_000_000 + Decimal("0.01") * RUNS

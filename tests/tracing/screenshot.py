"""The screenshot of docs/traces.md: the tests' run (a retry, an approval, a pooled step) in Jaeger's UI.

    python -m tests.tracing.screenshot --ui-assets JAEGER_UI_BUILD [--out docs/traces/run-trace.png]

Starts a broker and Jaeger (``calmrun.devjaeger``, serving a built Jaeger UI: jaeger-ui's
``packages/jaeger-ui/build``, which the Go module does not ship), runs the run of
``test_traces.py``, and shoots the trace's page in Debian's Chromium through Playwright.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.client import Client
from calmrun.devjaeger import DevJaeger
from calmrun.devkafka import DevKafka
from calmrun.localproc import free_port
from calmrun.streams.pool import PoolExecutor
from calmrun.streams.worker import Worker
from calmrun.tracing import run_ids
from calmrun.workflow.events import RunCommand, RunRequest
from tests.runtime_support import poll_states, ready
from tests.tracing.test_traces import classify, refund_flow, ship, traced

ROOT = Path(__file__).resolve().parents[2]


async def one_run(broker: str, jaeger: DevJaeger) -> str:
    """The run of the test; returns its trace ID (hex) once the processes stopped (spans exported)."""
    prefix = "docs"
    settings = traced(broker, prefix, jaeger.otlp_endpoint)
    wf, agents = refund_flow(), AgentRegistry({"classify": classify, "ship": ship})
    worker = Worker(settings, [wf], agents, ModelRegistry(settings.models))
    executor = PoolExecutor(settings, [wf], "gpu", agents, ModelRegistry(settings.models))
    await worker.start()
    await ready(worker)
    await executor.start()
    try:
        async with Client(settings) as client:
            run_id = await client.submit(
                RunRequest(workflow="refund", input={"n": 1, "text": "order 1234"}, run_id="refund-42")
            )
            await poll_states(client, [run_id], lambda s: s.steps.get("approve") is not None, 90)
            await poll_states(client, [run_id], lambda s: s.steps["approve"].status == "waiting", 90)
            await asyncio.sleep(1.0)  # a visible wait for the person, in the picture
            cmd = RunCommand(command="approve", run_id=run_id, workflow="refund", step="approve", by="alice")
            await client.command(cmd)
            await client.wait_terminal([run_id], wait_s=90)
    finally:
        await executor.stop()
        await worker.stop()
    return f"{run_ids(prefix, run_id)[0]:032x}"


async def shoot(url: str, out: Path) -> None:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1500, "height": 900})
        await page.goto(url)
        await page.wait_for_selector("text=run refund", timeout=30_000)
        await page.wait_for_timeout(1000)
        await page.screenshot(path=str(out))
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ui-assets", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "traces" / "run-trace.png")
    args = parser.parse_args()
    kafka = DevKafka(data_dir=Path(tempfile.mkdtemp(prefix="calmrun-shot-kafka-")), port=free_port())
    kafka.start()
    try:
        with DevJaeger(ui_assets=args.ui_assets) as jaeger:
            trace_id = asyncio.run(one_run(kafka.bootstrap, jaeger))
            for _ in range(100):  # the spans are exported; wait until Jaeger has the root
                got = jaeger.trace(int(trace_id, 16))
                if got and any(s["operationName"] == "run refund" for s in got["spans"]):
                    break
                asyncio.run(asyncio.sleep(0.3))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            asyncio.run(shoot(f"{jaeger.query_url}/trace/{trace_id}", args.out))
            print(f"{args.out}: trace {trace_id}")
    finally:
        kafka.stop()


if __name__ == "__main__":
    main()

"""Invoice reconciliation end to end: ``python -m examples.invoices.demo [--bootstrap HOST:PORT]``
(``make demo-invoices``).

Starts the project's KRaft broker on a free port (unless ``--bootstrap`` names one), runs the example
workflow (a map over the lines, a critique loop, an agent-chosen handler, a child workflow for disputes)
with its scripted agents,
submits four invoices (all lines matching, one line mispriced, far too large, 200 lines), prints each
run's outcome and one run's steps and history, then checks every history. Stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.check import check_history
from calmrun.cli.common import out
from calmrun.cli.runs import print_runs, print_status
from calmrun.client import Client
from calmrun.devkafka import DevKafka
from calmrun.localproc import free_port
from calmrun.settings import load_settings
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequest

HERE = Path(__file__).resolve().parent
PRICES = {"paper": "4.50", "toner": "89.00", "stapler": "12.00"}


def invoice(n: int, *, qty: int = 1, mispriced: int | None = None) -> list[dict[str, Any]]:
    skus = list(PRICES)
    lines = [{"sku": skus[i % 3], "qty": qty, "unit_price": PRICES[skus[i % 3]]} for i in range(n)]
    if mispriced is not None:
        lines[mispriced]["unit_price"] = "99.99"
    return lines


async def run(bootstrap: str) -> None:
    settings = load_settings(kafka={"bootstrap": bootstrap, "prefix": "invoices-demo"})
    wf, child = load_workflow(HERE / "workflow.yaml"), load_workflow(HERE / "dispute.yaml")
    invoices = {
        "inv-001": invoice(5),
        "inv-002": invoice(7, mispriced=3),
        "inv-003": invoice(3, qty=1000),
        "inv-004": invoice(200),
    }
    worker = Worker(settings, [wf, child], AgentRegistry(), ModelRegistry({}))
    await worker.start()
    try:
        async with Client(settings) as client:
            requests = [
                RunRequest(
                    workflow=wf.name, run_id=rid, input={"invoice_id": rid, "vendor": "acme", "lines": lines}
                )
                for rid, lines in invoices.items()
            ]
            t0 = time.monotonic()
            states = await client.wait_terminal(await client.submit_many(requests), wait_s=300)
            out.print(f"{len(states)} invoices reconciled in {time.monotonic() - t0:.1f}s")
            print_runs(sorted(states.values(), key=lambda s: s.run_id), states)
            print_status(states["inv-002"], await client.events("inv-002"))
            print_status(
                await client.state("inv-002.dispute") or states["inv-002"],
                await client.events("inv-002.dispute"),
            )
    finally:
        await worker.stop()
    report = await check_history(settings.kafka, [wf, child])
    out.print(
        f"history check: {'ok' if report.ok else 'FAILED'} ({report.runs} runs, {report.replayed} re-decided)"
    )
    if not report.ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.bootstrap:
        asyncio.run(run(args.bootstrap))
        return
    kafka = DevKafka(data_dir=Path(tempfile.mkdtemp(prefix="calmrun-invoices-kafka-")), port=free_port())
    kafka.start()
    try:
        asyncio.run(run(kafka.bootstrap))
    finally:
        kafka.stop()


if __name__ == "__main__":
    main()

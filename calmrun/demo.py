"""The main job end to end: a local broker, a worker, a batch of triage runs, their statuses and history.

``python -m calmrun.demo [--runs N] [--ui]`` (``make demo``): starts the project's KRaft broker on a free
port, runs the example triage workflow on scripted models (no network), submits N tickets, waits for every
run, prints statuses, throughput, latency and one run's event history; then three refunds above the
approval amount wait for a person: one is approved, one rejected, one times out (the demo shortens the
step's timeout to ``APPROVAL_TIMEOUT_S``), and their histories are printed. Then it stops everything it
started.
With ``--ui`` the operator page (``calmrun ui``) serves the demo's topics from the start, its address is
printed, and everything stays up after the batch until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.cli.common import out
from calmrun.cli.costs import batch_costs, journal_table, print_costs
from calmrun.cli.runs import print_runs, print_status
from calmrun.client import Client, summarize
from calmrun.costs.process import AggregatorProcess
from calmrun.devkafka import KAFKA_VERSION, DevKafka
from calmrun.gctune import settle_heap
from calmrun.localproc import free_port
from calmrun.settings import load_settings
from calmrun.streams.journal import journal_entries, read_request_costs, run_since
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, load_workflow, parse_workflow
from calmrun.workflow.events import RunCommand, RunRequest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "triage"
APPROVAL_STEP = "approve_refund"
APPROVAL_TIMEOUT_S = 2.0
"""The demo's approval timeout (the example's is a day), so that one run visibly expires."""
APPROVALS = {  # run ID -> (refund amount, the answer: a command and who gives it, or None: let it expire)
    "refund-approved": (240, ("approve", "finance-lead", "order checked: refund it")),
    "refund-rejected": (310, ("reject", "support-lead", "already refunded by card issuer")),
    "refund-expired": (420, None),
}


def demo_workflow() -> WorkflowDef:
    """The triage example with the approval step's timeout cut to ``APPROVAL_TIMEOUT_S``."""
    data = load_workflow(EXAMPLE / "workflow.yaml").model_dump(exclude_unset=True)
    for step in data["steps"]:
        if step["name"] == APPROVAL_STEP:
            step["timeout_s"] = APPROVAL_TIMEOUT_S
    return parse_workflow(data, source="the demo's triage workflow")


async def people_in_the_loop(client: Client, wf: WorkflowDef) -> None:
    """Three refunds above the approval amount: approve one, reject one, let one expire; print them."""
    out.print(f"[bold]people in the loop[/bold]: {len(APPROVALS)} refunds above the approval amount ...")
    ids = await client.submit_many(
        RunRequest(
            workflow=wf.name,
            run_id=run_id,
            input={
                "ticket_id": f"T-9{i:03d}",
                "customer": "Demo Customer",
                "subject": "Refund for a cancelled order",
                "body": f"Please refund ORD-7700{i}: I paid ${amount}.00 for an order the shop cancelled.",
            },
        )
        for i, (run_id, (amount, _)) in enumerate(APPROVALS.items())
    )
    deadline = time.monotonic() + 60
    for run_id, (_, answer) in APPROVALS.items():
        while True:
            state = await client.state(run_id)
            step = state.steps.get(APPROVAL_STEP) if state else None
            if step is not None and step.status == "waiting":
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{run_id} never waited for its approval: {state}")
            await asyncio.sleep(0.05)
        if answer is not None:
            command, by, comment = answer
            await client.command(
                RunCommand(
                    command=command,
                    run_id=run_id,
                    workflow=wf.name,
                    step=APPROVAL_STEP,
                    by=by,
                    comment=comment,
                )
            )
    states = await client.wait_terminal(ids, wait_s=60)
    for run_id in ids:
        print_status(states[run_id], await client.events(run_id))
    outcomes = {run_id: states[run_id].outcome for run_id in ids}
    if outcomes != {
        "refund-approved": "refunded",
        "refund-rejected": "declined",
        "refund-expired": "expired",
    }:
        out.print(f"[red]the approvals did not end as answered: {outcomes}[/red]")
        raise SystemExit(1)


async def run_demo(bootstrap: str, runs: int, ui_port: int | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    settings = load_settings(EXAMPLE / "models.yaml", kafka={"bootstrap": bootstrap, "prefix": "demo"})
    wf = demo_workflow()
    tickets = [
        json.loads(line) for line in (EXAMPLE / "tickets.jsonl").read_text().splitlines() if line.strip()
    ]
    worker = Worker(settings, [wf], AgentRegistry(), ModelRegistry(settings.models))
    await worker.start()
    settle_heap(settings.worker.gc_threshold)
    aggregator = AggregatorProcess(settings).start()
    page = None
    if ui_port is not None:
        from calmrun.ui import Access, UiServer

        ui_settings = settings.model_copy(update={"ui": settings.ui.model_copy(update={"port": ui_port})})
        page = UiServer(ui_settings, Access(ui_settings.ui), [wf])
        url = await page.start()
        out.print(f"[bold]operator page: {url}[/bold] (calmrun ui; open it to watch the batch)")
    try:
        async with Client(settings) as client:
            requests = [
                RunRequest(workflow=wf.name, run_id=f"ticket-{i:05d}", input=tickets[i % len(tickets)])
                for i in range(runs)
            ]
            out.print(f"submitting {runs} triage runs ...")
            t0 = time.monotonic()
            ids = await client.submit_many(requests)
            states = await client.wait_terminal(ids, wait_s=300)
            elapsed = time.monotonic() - t0
            latencies = [s.clock_ms - s.created_ms for s in states.values()]
            recent = sorted(states.values(), key=lambda s: s.run_id)[:10]
            print_runs(recent, states)
            out.print(
                f"[bold]{runs} runs in {elapsed:.2f}s = {runs / elapsed:.0f} runs/s[/bold]; "
                f"request->completion p50 {statistics.median(latencies):.0f} ms, max {max(latencies)} ms "
                f"(worker: {worker.stats.tasks_started} step tasks, "
                f"peak {worker.stats.peak_running} in flight)"
            )
            refunded = next((s for s in recent if s.outcome == "refunded"), recent[0])
            costs = await read_request_costs(settings, refunded.run_id, refunded.created_ms)
            print_status(refunded, await client.events(refunded.run_id), None, costs)
            entries = await journal_entries(settings, refunded.run_id, run_since(refunded.created_ms))
            out.print(journal_table(entries))  # its agents' journal (docs/durable-agents.md)
            summary = summarize(states)
            if summary["by_status"].get("completed") != runs:
                out.print(f"[red]not every run completed: {summary}[/red]")
                raise SystemExit(1)
            await people_in_the_loop(client, wf)
        out.print("waiting for the cost aggregator to cover every event ...")
        table = await batch_costs(settings)
        print_costs(table, "model")
        print_costs(table, "workflow")
        if page is not None:
            out.print(f"[bold]the operator page stays open at {page.url}[/bold]; Ctrl-C stops the demo")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        if page is not None:
            await page.stop()
        aggregator.stop()
        await worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--ui", action="store_true", help="serve the operator page and keep it open")
    parser.add_argument("--ui-port", type=int, default=8765, help="its port on 127.0.0.1 (0: any free one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # a fresh broker answers "coordinator not available" for a moment; aiokafka logs each retry as an error
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if not sys.stdout.isatty():  # piped or captured: wide tables rather than 80 columns
        os.environ.setdefault("COLUMNS", "150")
        out.width = int(os.environ["COLUMNS"])
    ui_port = args.ui_port if args.ui else None
    if args.bootstrap:
        asyncio.run(run_demo(args.bootstrap, args.runs, ui_port))
        return
    data = Path(tempfile.mkdtemp(prefix="calmrun-demo-kafka-"))
    kafka = DevKafka(data_dir=data, port=free_port())
    out.print(f"starting Kafka {KAFKA_VERSION} (KRaft) from the project's launcher ...")
    t0 = time.monotonic()
    kafka.start()
    out.print(
        f"broker answers at {kafka.bootstrap} after {time.monotonic() - t0:.1f}s (pid {kafka.running_pid()})"
    )
    try:
        asyncio.run(run_demo(kafka.bootstrap, args.runs, ui_port))
    finally:
        kafka.stop()
        out.print("broker stopped")


if __name__ == "__main__":
    main()

"""A soak: steady load on the example workflow (triage) on a three-node cluster, sampled each minute.

    python -m bench.soak [--minutes 20] [--rate 8] [--bootstrap B] [--out bench/results/soak]

Two worker processes run ``examples/triage/workflow.yaml`` with its scripted models, wrapped so that a few
percent of model calls fail (``FAIL``; the step is retried, or the run is parked when out of attempts) and a
few are slow (``SLOW``, ``SLOW_S`` seconds). Refunds above the approval amount wait for a person; a script
approves each one it finds waiting (the approval that times out ends the run as ``expired``). Each
``--sample-s`` the soak records the workers' and brokers' RSS and open file descriptors and the group's
consumer lag. At the end it stops submitting, waits for every run to end, runs the history checker and
writes ``soak.json`` and ``soak.md`` (the figures) to ``--out``. Without ``--bootstrap`` it starts its own
cluster (``calmrun.devkafka.cluster``) in a temporary directory. ``make soak`` runs the full 20 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "triage"
FAIL, SLOW, SLOW_S = 0.03, 0.03, 2.0
APPROVER = "finance-lead"
"""One of the approval step's ``approvers`` (examples/triage/workflow.yaml): the script answers as them."""


def flaky(name: str) -> Any:
    """The scripted model ``name`` (fast or smart), failing ``FAIL`` and slow ``SLOW`` of its calls."""
    from examples.triage import scripted

    inner = getattr(scripted, name)

    async def call(messages: Any, info: Any) -> Any:
        roll = random.random()
        if roll < FAIL:
            raise RuntimeError("soak: an injected model failure")
        if roll < FAIL + SLOW:
            await asyncio.sleep(SLOW_S)
        return inner(messages, info)

    return call


async def flaky_fast(messages: Any, info: Any) -> Any:
    return await flaky("fast")(messages, info)


async def flaky_smart(messages: Any, info: Any) -> Any:
    return await flaky("smart")(messages, info)


def settings(bootstrap: str, prefix: str) -> Any:
    from calmrun.settings import load_settings

    models = {
        "fast": {"model": "function:bench.soak:flaky_fast", "temperature": 0},
        "smart": {"model": "function:bench.soak:flaky_smart", "temperature": 0, "max_tokens": 400},
    }
    return load_settings(kafka={"bootstrap": bootstrap, "prefix": prefix}, models=models)


def workflow() -> Any:
    from calmrun.workflow.definition import load_workflow

    wf = load_workflow(EXAMPLE / "workflow.yaml")
    data = wf.model_dump(mode="json")
    for step in data["steps"]:  # the approval's timeout short enough that some expire within the soak
        if step.get("kind") == "approval":
            step["timeout_s"] = 60
    from calmrun.workflow.definition import parse_workflow

    return parse_workflow(data)


async def worker_main(bootstrap: str, prefix: str) -> None:
    """One worker process of the soak (``python -m bench.soak worker``)."""
    from calmrun.agents import AgentRegistry, ModelRegistry
    from calmrun.streams.worker import Worker

    s = settings(bootstrap, prefix)
    await Worker(s, [workflow()], AgentRegistry(), ModelRegistry(s.models)).run()


def ticket(tickets: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The n-th run's input: the example tickets in turn, and every 20th a refund above the approval
    amount (it waits for the approver script)."""
    if n % 20 == 10:
        body = f"Please refund ORD-88{n:05d}: I paid $240.00 for an order the shop cancelled."
        return {"ticket_id": f"T-S{n}", "customer": "Soak Customer", "subject": "Refund", "body": body}
    return tickets[n % len(tickets)]


def start_worker(bootstrap: str, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.soak", "worker", "--bootstrap", bootstrap, "--prefix", prefix]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def rss_and_fds(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of ``pid``; (0, 0) when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return 0, 0


async def lag(s: Any, ends_reader: Any) -> int:
    """The workers' group lag: end offsets minus committed offsets, over its input topics."""
    from aiokafka.errors import KafkaError

    from calmrun.kafka.topics import admin_client

    try:
        async with admin_client(s.kafka, "soak") as admin:
            committed = await admin.list_consumer_group_offsets(s.group_id)
    except KafkaError:  # the group has no coordinator yet (a fresh cluster): no lag to tell
        return -1
    ends = await ends_reader.end_offsets(list(committed))
    return sum(max(0, ends[tp] - meta.offset) for tp, meta in committed.items() if meta.offset >= 0)


async def approver(client: Any, wf: Any, stop: asyncio.Event, answered: set[str]) -> None:
    """Approve every refund found waiting (every 5 s), as a person working a queue would."""
    from calmrun.workflow.events import RunCommand

    while not stop.is_set():
        for run_id, state in (await client.read_states()).items():
            step = state.steps.get("approve_refund")
            if step is not None and step.status == "waiting" and run_id not in answered:
                answered.add(run_id)
                cmd = RunCommand(
                    command="approve", run_id=run_id, workflow=wf.name, step="approve_refund", by=APPROVER
                )
                await client.command(cmd)
        await asyncio.sleep(5)


async def soak(
    bootstrap: str,
    minutes: float,
    rate: float,
    sample_s: float,
    broker_pids: list[int],
    log_dir: Path,
) -> dict[str, Any]:
    """Run the soak against ``bootstrap``; returns its figures (see the module docstring)."""
    from calmrun.check import check_history
    from calmrun.client import Client
    from calmrun.kafka.topics import ensure_topics
    from calmrun.workflow.events import RunRequest

    prefix = f"soak{uuid4().hex[:6]}"
    s, wf = settings(bootstrap, prefix), workflow()
    await ensure_topics(s.kafka, [wf])
    tickets = [json.loads(x) for x in (EXAMPLE / "tickets.jsonl").read_text().splitlines() if x.strip()]
    workers = [start_worker(bootstrap, prefix, log_dir / f"worker-{i}.log") for i in (1, 2)]
    samples: list[dict[str, Any]] = []
    ids: list[str] = []
    stop, answered = asyncio.Event(), set[str]()
    from aiokafka import AIOKafkaConsumer

    reader = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap)  # end offsets, for the lag
    await reader.start()
    try:
        async with Client(s) as client:
            approving = asyncio.create_task(approver(client, wf, stop, answered))
            t0 = time.monotonic()
            next_sample = t0
            n = 0
            while time.monotonic() - t0 < minutes * 60:
                due = int((time.monotonic() - t0) * rate) - n
                if due > 0:
                    batch = [
                        RunRequest(workflow=wf.name, run_id=f"{prefix}-{n + i}", input=ticket(tickets, n + i))
                        for i in range(due)
                    ]
                    ids += await client.submit_many(batch)
                    n += due
                if time.monotonic() >= next_sample:
                    samples.append(await sample(s, reader, workers, broker_pids, time.monotonic() - t0, n))
                    next_sample += sample_s
                for w in workers:
                    if w.poll() is not None:
                        raise RuntimeError(f"a soak worker exited with {w.returncode}; see {log_dir}")
                await asyncio.sleep(0.2)
            states = await client.wait_terminal(ids, wait_s=300)
            samples.append(await sample(s, reader, workers, broker_pids, time.monotonic() - t0, n))
            stop.set()
            await approving
    finally:
        await reader.stop()
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(60)
    report = await check_history(s.kafka, [wf])
    ends: dict[str, int] = {}
    for st in states.values():
        # a quarantined run says why (an injected failure that outlived its attempts is expected, rarely)
        detail = st.outcome or st.error_type
        key = f"{st.status}:{detail}" if detail else st.status
        ends[key] = ends.get(key, 0) + 1
    return {
        "minutes": minutes,
        "rate_per_s": rate,
        "runs": len(ids),
        "ends": ends,
        "approved_by_script": len(answered),
        "checker_ok": report.ok,
        "checker": report.summary(),
        "samples": samples,
    }


async def sample(
    s: Any, reader: Any, workers: list[Any], brokers: list[int], at_s: float, submitted: int
) -> dict[str, Any]:
    w = [rss_and_fds(p.pid) for p in workers]
    b = [rss_and_fds(pid) for pid in brokers]
    return {
        "t_s": round(at_s),
        "submitted": submitted,
        "worker_rss_mib": [round(r / 1024) for r, _ in w],
        "worker_fds": [f for _, f in w],
        "broker_rss_mib": [round(r / 1024) for r, _ in b],
        "broker_fds": [f for _, f in b],
        "lag": await lag(s, reader),
    }


def markdown(fig: dict[str, Any]) -> str:
    rows = [
        "| t (s) | submitted | worker RSS (MiB) | worker fds | broker RSS (MiB) | broker fds | lag |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in fig["samples"]:
        rows.append(
            f"| {x['t_s']} | {x['submitted']} | {x['worker_rss_mib']} | {x['worker_fds']} | "
            f"{x['broker_rss_mib']} | {x['broker_fds']} | {x['lag']} |"
        )
    head = (
        f"Soak: {fig['minutes']} min at {fig['rate_per_s']} runs/s, {fig['runs']} runs, ends {fig['ends']}, "
        f"{fig['approved_by_script']} approved by the script; checker: {fig['checker']}\n\n"
        "Command: `python -m bench.soak` (`make soak`)\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("command", nargs="?", default="soak", choices=["soak", "worker"])
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--rate", type=float, default=8, help="runs submitted per second")
    p.add_argument("--sample-s", type=float, default=60)
    p.add_argument("--bootstrap", default=None, help="use this cluster instead of starting one")
    p.add_argument("--prefix", default="soak")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    args = p.parse_args(argv)
    if args.command == "worker":
        asyncio.run(worker_main(args.bootstrap, args.prefix))
        return 0
    from calmrun.devkafka.cluster import DevCluster

    work = Path(tempfile.mkdtemp(prefix="calmrun-soak-"))
    cluster = None if args.bootstrap else DevCluster(work / "cluster", brokers=3)
    try:
        if cluster is not None:
            cluster.start()
        bootstrap = args.bootstrap or (cluster.bootstrap if cluster else "")
        pids = [pid for i in cluster.ids if (pid := cluster.pid(i))] if cluster else []
        fig = asyncio.run(soak(bootstrap, args.minutes, args.rate, args.sample_s, pids, work))
    finally:
        if cluster is not None:
            cluster.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(fig, indent=1))
    (args.out / "soak.md").write_text(markdown(fig))
    print(markdown(fig))
    return 0 if fig["checker_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

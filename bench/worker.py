"""A calmrun worker as its own process for the benchmarks: the three-step no-op workflow, ~200-byte outputs.

    python -m bench.worker --bootstrap B --prefix P --status-file F [--status-every S] [--max-in-flight N]
        [--acks all|1] [--no-idempotence] [--linger-ms MS] [--sleep S] [--profile OUT] [--triage]
        [--pooled STEP=POOL] [--pool NAME] [--tracing OTLP_URL]

Runs ``lin`` (``tests.runtime_support.linear``: s1 -> s2 -> s3) with the agent ``bench_step`` (returns at
once, or after ``--sleep`` seconds) until SIGTERM; with ``--triage``, the triage example instead
(``examples/triage``: its pydantic-ai agents on the scripted models of its ``models.yaml``). Several
workers started on one prefix form one consumer group and share the partitions. Every ``--status-every``
seconds (0.1 by default; the measured loops of ``bench.driver.measure`` ask for 1: at 0.1 s the file's
writes were 3.8 % of the worker's CPU samples at 100 in flight), once started and once after
stop it writes its stats, owned partitions and RSS (current and peak, KiB) to the status file. With
``--profile`` the whole life of the worker runs under pyinstrument; the profile is written as text
(``OUT``) and as JSON by package. ``--pooled s2=slow`` puts a step in a pool; ``--pool slow`` runs that
pool's executor instead.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel

from bench.common import PARTITIONS, ROOT, rss_kib, write_status
from bench.profile import summarise
from calmrun import eventloop
from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.settings import load_settings
from calmrun.streams.pool import PoolExecutor
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, load_workflow, parse_workflow
from tests.runtime_support import linear

WORKFLOW = "lin"
TRIAGE = ROOT / "examples" / "triage"
STEPS = 3
PAD = "x" * 170
SLEEP_S = 0.0


class Item(BaseModel):
    n: int = 0


class Out(BaseModel):
    n: int
    label: str
    pad: str


async def bench_step(ctx: StepContext, item: Item) -> Out:
    """The no-op step: its output is about 200 bytes of JSON."""
    if SLEEP_S:
        await asyncio.sleep(SLEEP_S)
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}", pad=PAD)


def make_worker(
    bootstrap: str,
    prefix: str,
    *,
    max_in_flight: int = 100,
    acks: str = "all",
    idempotence: bool = True,
    linger_ms: int | None = None,
    pooled: dict[str, str] | None = None,
    triage: bool = False,
    tracing: str | None = None,
) -> Worker:
    kafka = {"bootstrap": bootstrap, "prefix": prefix, "partitions": PARTITIONS, "acks": acks}
    kafka |= {"idempotence": idempotence} | ({} if linger_ms is None else {"linger_ms": linger_ms})
    settings = load_settings(
        TRIAGE / "models.yaml" if triage else None,
        kafka=kafka,
        worker={"max_in_flight": max_in_flight, "commit_interval_s": 1.0, "timer_interval_s": 0.2},
        tracing={"endpoint": tracing} if tracing else {},
    )
    if triage:
        wf = load_workflow(TRIAGE / "workflow.yaml")
        return Worker(settings, [wf], AgentRegistry(), ModelRegistry(settings.models))
    return Worker(
        settings, [workflow(pooled or {})], AgentRegistry({"bench_step": bench_step}), ModelRegistry({})
    )


def workflow(pooled: dict[str, str]) -> WorkflowDef:
    """The bench workflow, its steps in the pools given (step -> pool)."""
    wf = linear(WORKFLOW, STEPS, agent="bench_step")
    data = wf.model_dump(mode="json")
    for step in data["steps"]:
        step["pool"] = pooled.get(step["name"], "default")
    return parse_workflow(data)


def make_executor(bootstrap: str, prefix: str, pool: str, pooled: dict[str, str], mif: int) -> PoolExecutor:
    settings = load_settings(
        kafka={"bootstrap": bootstrap, "prefix": prefix, "partitions": PARTITIONS},
        worker={"max_in_flight": mif, "commit_interval_s": 1.0},
    )
    agents = AgentRegistry({"bench_step": bench_step})
    return PoolExecutor(settings, [workflow(pooled)], pool, agents, ModelRegistry({}))


async def run_executor(args: argparse.Namespace, pooled: dict[str, str]) -> None:
    ex = make_executor(args.bootstrap, args.prefix, args.pool, pooled, args.max_in_flight)
    status = Path(args.status_file) if args.status_file else None

    def write(state: str) -> None:
        stats = dataclasses.asdict(ex.counts) | dataclasses.asdict(ex.tasks.counts)
        data = {"pid": os.getpid(), "state": state, "owned": sorted(ex.owned), "stats": stats}
        write_status(status, data | {"rss": rss_kib()})

    runner = asyncio.create_task(ex.run(lambda: write("running")))
    while not runner.done():
        await asyncio.wait({runner}, timeout=args.status_every)
        if ex.owned:
            write("running")
    write("stopped")
    runner.result()


def _status(path: Path | None, worker: Worker, state: str) -> None:
    write_status(
        path,
        {
            "pid": os.getpid(),
            "state": state,
            "owned": sorted(worker.parts.owned),
            "stats": dataclasses.asdict(worker.stats),
            "rss": rss_kib(),
            "runs_held": sum(len(t) for t in worker.parts.runs.values()),
        },
    )


async def main(args: argparse.Namespace) -> None:
    global SLEEP_S
    SLEEP_S = args.sleep
    pooled = dict(p.split("=", 1) for p in args.pooled)
    if args.pool:
        await run_executor(args, pooled)
        return
    worker = make_worker(
        args.bootstrap,
        args.prefix,
        max_in_flight=args.max_in_flight,
        acks=args.acks,
        idempotence=not args.no_idempotence,
        linger_ms=args.linger_ms,
        pooled=pooled,
        triage=args.triage,
        tracing=args.tracing,
    )
    status = Path(args.status_file) if args.status_file else None
    runner = asyncio.create_task(worker.run(lambda: _status(status, worker, "running")))
    while not runner.done():
        await asyncio.wait({runner}, timeout=args.status_every)
        if worker.parts.owned:
            _status(status, worker, "running")
    _status(status, worker, "stopped")
    runner.result()


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--status-file")
    parser.add_argument("--status-every", type=float, default=0.1, help="seconds between status writes")
    parser.add_argument("--max-in-flight", type=int, default=100)
    parser.add_argument("--acks", default="all", choices=["all", "1"])
    parser.add_argument("--no-idempotence", action="store_true")
    parser.add_argument("--linger-ms", type=int, help="producer linger (default: the runtime's)")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--pooled", action="append", default=[], help="STEP=POOL: the step's pool")
    parser.add_argument("--pool", help="run an executor of this pool instead of a deciding worker")
    parser.add_argument("--profile")
    parser.add_argument("--triage", action="store_true", help="the triage example instead of lin")
    parser.add_argument("--tracing", help="export traces to this OTLP/HTTP endpoint (bench.tracing)")
    parser.add_argument(
        "--preload", help="a Python file executed before the worker starts (bench-only patch experiments)"
    )
    parser.add_argument(
        "--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"], help="as worker.event_loop"
    )
    args = parser.parse_args()
    if args.preload:
        import runpy

        runpy.run_path(args.preload)
    logging.basicConfig(level=logging.WARNING)
    if not args.profile:
        eventloop.run(main(args), args.event_loop)
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        eventloop.run(main(args), args.event_loop)
    finally:
        profiler.stop()
        Path(args.profile).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        session = profiler.last_session
        root = session.root_frame() if session is not None else None
        if root is not None:
            Path(args.profile + ".json").write_text(json.dumps(summarise(root), indent=2))


if __name__ == "__main__":
    cli()

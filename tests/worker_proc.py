"""A calmrun worker as its own OS process, for the fault tests (kill -9, several workers in one group).

    python -m tests.worker_proc --bootstrap B --prefix P [--sleep S] [--max-in-flight N] [--status-file F]

Runs the ``lin`` workflow of ``tests.runtime_support.linear`` with the agent ``add_one`` (sleeping ``S``
seconds first), or with ``--workflow fork`` the branching ``tests.runtime_support.branchy`` whose agents
log every start (``--start-log``), or with ``--workflow people`` the approval/signal workflows of
``tests.people.flows``, until SIGTERM or SIGINT, then stops the worker cleanly. With
``--status-file``, the worker's stats, owned partitions and pid are written there as JSON (atomically)
every 0.1 s and once more after stop. ``--pooled STEP=POOL`` puts a step in a pool; ``--pool NAME`` runs
that pool's executor instead of a deciding worker (``--pool none``: a worker that only decides).
``CALMRUN_TEST_DEBUG_LOGGERS=a,b`` sets those loggers to DEBUG (a fault run's evidence).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.settings import load_settings
from calmrun.streams.pool import PoolExecutor
from calmrun.streams.worker import Worker, wall_ms
from calmrun.workflow.definition import DEFAULT_POOL, WorkflowDef, parse_workflow
from tests import runtime_support
from tests.people.flows import people_agents, people_flows
from tests.runtime_support import branchy, linear, nonce_step, sleepy_add_one
from tests.workflow.flows import kinds_agents, kinds_flows


def _write_status(path: Path | None, worker: Worker, state: str) -> None:
    if path is None:
        return
    data = {
        "pid": os.getpid(),
        "state": state,
        "owned": sorted(worker.parts.owned),
        "stats": dataclasses.asdict(worker.stats),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


async def main(args: argparse.Namespace) -> None:
    runtime_support.SLEEP_S = args.sleep
    runtime_support.START_LOG = args.start_log
    settings = load_settings(
        kafka={"bootstrap": args.bootstrap, "prefix": args.prefix, "partitions": args.partitions},
        worker={
            "max_in_flight": args.max_in_flight,
            "commit_interval_s": args.commit_interval,
            "timer_interval_s": 0.1,
            "session_timeout_s": args.session_timeout,
            "instance_id": args.instance_id,
            "deadline_grace_s": args.deadline_grace,
            "task_records": False if args.no_task_records else "auto",
        }
        | ({} if args.liveness is None else {"liveness": liveness(args.liveness)}),
    )
    if args.workflow == "people":
        workflows, agents = people_flows(), people_agents()
    elif args.workflow == "kinds":  # a wide map, then a child run (tests.workflow.flows)
        workflows, agents = kinds_flows(), kinds_agents()
    else:
        workflows = [pooled(branchy() if args.workflow == "fork" else linear(), args.pooled)]
        agents = AgentRegistry({"add_one": sleepy_add_one, "nonce": nonce_step})
    status = Path(args.status_file) if args.status_file else None
    if args.pool not in (None, "none"):
        await run_executor(PoolExecutor(settings, workflows, args.pool, agents, ModelRegistry({})), status)
        return
    worker = Worker(
        settings,
        workflows,
        agents,
        ModelRegistry({}),
        pool=None if args.pool == "none" else DEFAULT_POOL,
        clock=jumping_clock(Path(args.clock_file)) if args.clock_file else wall_ms,
    )
    runner = asyncio.create_task(worker.run(lambda: _write_status(status, worker, "running")))
    try:
        while not runner.done():
            await asyncio.wait({runner}, timeout=0.1)
            _write_status(status, worker, "running")
        runner.result()
    finally:
        _write_status(status, worker, "stopped")


def liveness(dead_after_s: float) -> dict[str, object]:
    """``worker.liveness`` for ``--liveness S``: on with a peer dead after ``S`` s; 0: off."""
    return {"enabled": True, "dead_after_s": dead_after_s} if dead_after_s > 0 else {"enabled": False}


def jumping_clock(path: Path) -> Callable[[], int]:
    """The wall clock plus the milliseconds written in ``path`` (re-read every 0.1 s): a clock that a test
    makes jump forward or back while the worker runs."""
    seen = [0.0, 0]

    def now() -> int:
        if time.monotonic() - seen[0] > 0.1:
            seen[0] = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                seen[1] = int(path.read_text().strip() or 0)
        return wall_ms() + int(seen[1])

    return now


def pooled(wf: WorkflowDef, pools: list[str]) -> WorkflowDef:
    """``wf`` with ``STEP=POOL`` pools set on its steps (``--pooled s2=slow``)."""
    wanted = dict(p.split("=", 1) for p in pools)
    data = wf.model_dump(mode="json")
    for step in data["steps"]:
        if step["name"] in wanted:
            step["pool"] = wanted[step["name"]]
    return parse_workflow(data)


async def run_executor(ex: PoolExecutor, status: Path | None) -> None:
    def write(state: str) -> None:
        if status is not None:
            data = {"pid": os.getpid(), "state": state, "owned": sorted(ex.owned)}
            data["stats"] = dataclasses.asdict(ex.counts) | dataclasses.asdict(ex.tasks.counts)
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(status)

    runner = asyncio.create_task(ex.run(lambda: write("running")))
    try:
        while not runner.done():
            await asyncio.wait({runner}, timeout=0.1)
            write("running")
        runner.result()
    finally:
        write("stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.worker_proc")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds each agent call sleeps")
    p.add_argument("--max-in-flight", type=int, default=100)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--commit-interval", type=float, default=0.2)
    p.add_argument("--status-file", default=None)
    p.add_argument("--workflow", choices=["lin", "fork", "people", "kinds"], default="lin")
    p.add_argument("--start-log", default=None, help="append every agent start here (JSON lines)")
    p.add_argument("--instance-id", default=None, help="static group membership")
    p.add_argument("--session-timeout", type=float, default=6.0)
    p.add_argument("--deadline-grace", type=float, default=30.0)
    p.add_argument(
        "--liveness", type=float, default=None, help="peers dead after S s; 0: off; unset: the default"
    )
    p.add_argument("--no-task-records", action="store_true", help="worker.task_records off (default: auto)")
    p.add_argument("--pool", default=None, help="run an executor of this pool ('none': decide only)")
    p.add_argument("--clock-file", default=None, help="milliseconds added to the worker's clock")
    p.add_argument("--pooled", action="append", default=[], help="STEP=POOL: the step's pool")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("calmrun.worker").setLevel(logging.INFO)
    logging.getLogger("calmrun.pool").setLevel(logging.INFO)
    logging.getLogger("calmrun.liveness").setLevel(logging.INFO)
    for name in filter(None, os.environ.get("CALMRUN_TEST_DEBUG_LOGGERS", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)  # a fault run's evidence (tests/faults)
    asyncio.run(main(parse_args()))

"""What a worker keeps per finished run: the soak's workflow (triage, scripted models) in one worker process.

    python -m bench.retained [--runs 2000] [--warm 300] [--in-flight 300] [--bootstrap B] [--trace]
                             [--out DIR]

One worker runs ``examples/triage/workflow.yaml`` with its scripted models (as ``bench.soak`` runs it, without
its injected failures and approvals) in this process. ``--warm`` runs finish first (first-time allocations:
imports, pydantic-ai's caches, the Kafka clients' buffers); then ``--runs`` more. Between the two points the
bench reports the growth per finished run of: the process's RSS (``/proc/self/status``), the live objects by
type (``gc.get_objects()``), the worker's per-run structures by name and, with ``--trace``, the allocations by
source line (``tracemalloc``, which slows the worker about twofold: RSS is then not the figure to read).
Without ``--bootstrap`` it starts its own broker (``calmrun.devkafka``) in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import uuid4

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "triage"


def rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


def settings(bootstrap: str, prefix: str) -> Any:
    from calmrun.settings import load_settings

    models = {
        "fast": {"model": "function:examples.triage.scripted:fast", "temperature": 0},
        "smart": {"model": "function:examples.triage.scripted:smart", "temperature": 0, "max_tokens": 400},
    }
    return load_settings(kafka={"bootstrap": bootstrap, "prefix": prefix}, models=models)


def structures(worker: Any) -> dict[str, int]:
    """Entries (and bytes) of the worker's structures that may be kept per run."""
    out: dict[str, int] = {}
    tables = worker.parts.runs.values()
    out["runtable.live"] = sum(len(t._live) for t in tables)
    out["runtable.done"] = sum(len(t._done) for t in tables)
    out["runtable.done_bytes"] = sum(len(b) for t in tables for b in t._done.values())
    j = worker.attempts.journal
    if j is not None:
        if hasattr(j, "held"):
            out.update({f"journal.{k}": v for k, v in j.held().items()})
        else:  # before the reader dropped ended attempts (to measure the code before the fix)
            out["journal.attempts"] = sum(len(t.by_key) for t in j._tails.values())
            out["journal.records"] = sum(len(v) for t in j._tails.values() for v in t.by_key.values())
    out["attempts.first"] = len(worker.attempts._first)
    return out


def types_now() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


async def finish(
    worker: Any, client: Any, wf: str, start: int, n: int, deadline_s: float, in_flight: int
) -> None:
    """Submit runs ``start`` .. ``start + n`` of the example's tickets; wait until the worker ends them."""
    from calmrun.workflow.events import RunRequest

    tickets = [json.loads(x) for x in (EXAMPLE / "tickets.jsonl").read_text().splitlines() if x.strip()]
    base, target, submitted = worker.stats.completed, worker.stats.completed + n, 0
    step = min(100, in_flight)
    for i in range(start, start + n, step):
        reqs = [
            RunRequest(workflow=wf, run_id=f"r-{j:07d}", input=tickets[j % len(tickets)])
            for j in range(i, min(i + step, start + n))
        ]
        await client.submit_many(reqs)
        submitted += len(reqs)
        while worker.stats.completed - base < submitted - in_flight:  # noqa: ASYNC110 (a counter, polled)
            await asyncio.sleep(0.05)
    end = time.monotonic() + deadline_s
    while worker.stats.completed < target:
        if time.monotonic() > end:
            raise TimeoutError(f"{target - worker.stats.completed} runs not finished in {deadline_s} s")
        if worker.failure is not None:
            raise RuntimeError(f"the worker failed: {worker.failure!r}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let the last transactions commit (a measurement pause, not synchronisation)


async def measure(bootstrap: str, warm: int, runs: int, trace: bool, in_flight: int) -> dict[str, Any]:
    from calmrun.agents import AgentRegistry, ModelRegistry
    from calmrun.client import Client
    from calmrun.gctune import settle_heap
    from calmrun.streams.worker import Worker
    from calmrun.workflow.definition import load_workflow

    s = settings(bootstrap, f"ret{uuid4().hex[:6]}")
    wf = load_workflow(EXAMPLE / "workflow.yaml")
    worker = Worker(s, [wf], AgentRegistry(), ModelRegistry(s.models))
    await worker.start()
    settle_heap(s.worker.gc_threshold)
    try:
        async with Client(s) as client:
            await finish(worker, client, wf.name, 0, warm, 600, in_flight)
            if trace:
                tracemalloc.start(8)
            t0, r0, k0 = types_now(), rss_kib(), structures(worker)
            s0 = tracemalloc.take_snapshot() if trace else None
            done0 = worker.stats.completed
            await finish(worker, client, wf.name, warm, runs, 1200, in_flight)
            done = worker.stats.completed - done0
            t1, r1, k1 = types_now(), rss_kib(), structures(worker)
            s1 = tracemalloc.take_snapshot() if trace else None
    finally:
        await worker.stop()
    per_type = {k: v / done for k, v in (t1 - t0).most_common(25)}
    fig: dict[str, Any] = {
        "warm": warm,
        "in_flight": in_flight,
        "runs": done,
        "rss_kib_per_run": round((r1 - r0) / done, 2),
        "objects_per_run": round(sum((t1 - t0).values()) / done, 1),
        "objects_per_run_by_type": {k: round(v, 2) for k, v in per_type.items()},
        "structures_before": k0,
        "structures_after": k1,
    }
    if s0 is not None and s1 is not None:
        filt = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = s1.filter_traces(filt).compare_to(s0.filter_traces(filt), "traceback")
        total = sum(d.size_diff for d in diff)
        fig["traced_bytes_per_run"] = round(total / done, 1)
        by_line: Counter[str] = Counter()
        for d in diff:  # each growth under the innermost calmrun frame that led to it (or the innermost)
            frames = [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno}" for f in d.traceback]
            ours = [f for f in frames if f.startswith("calmrun/")]  # frames: oldest first
            by_line[ours[-1] if ours else frames[-1]] += d.size_diff
        top = [{"at": at, "bytes_per_run": round(b / done, 1)} for at, b in by_line.most_common(15)]
        fig["traced_top"] = top
    return fig


def markdown(fig: dict[str, Any]) -> str:
    lines = [
        f"Finished runs of examples/triage in one worker: {fig['warm']} to warm up, "
        f"then {fig['runs']} measured, at most {fig['in_flight']} in flight.",
        "",
        f"- RSS growth per finished run: {fig['rss_kib_per_run']} KiB",
        f"- live objects per finished run: {fig['objects_per_run']}",
    ]
    if "traced_bytes_per_run" in fig:
        lines.append(f"- traced bytes per finished run (tracemalloc): {fig['traced_bytes_per_run']}")
    if "traced_top" in fig:
        lines += ["", "| allocated at (innermost calmrun frame) | bytes per run |", "|---|---|"]
        lines += [f"| {x['at']} | {x['bytes_per_run']} |" for x in fig["traced_top"]]
    lines += ["", "| structure | entries before | entries after |", "|---|---|---|"]
    for k, v in fig["structures_after"].items():
        lines.append(f"| {k} | {fig['structures_before'].get(k, 0)} | {v} |")
    lines += ["", "| type | objects per run |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in fig["objects_per_run_by_type"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.retained", description=__doc__)
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--warm", type=int, default=300)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--trace", action="store_true", help="tracemalloc by source line (slower)")
    p.add_argument("--in-flight", type=int, default=300, help="runs submitted and not finished, at most")
    p.add_argument("--out", type=Path, default=None, help="write retained.json and retained.md here")
    args = p.parse_args(argv)
    from calmrun.devkafka import DevKafka
    from calmrun.localproc import free_port

    broker = None
    if args.bootstrap is None:
        broker = DevKafka(data_dir=Path(tempfile.mkdtemp(prefix="calmrun-retained-")), port=free_port())
        broker.start()
    try:
        bootstrap = args.bootstrap or (broker.bootstrap if broker else "")
        fig = asyncio.run(measure(bootstrap, args.warm, args.runs, args.trace, args.in_flight))
    finally:
        if broker is not None:
            broker.stop()
    text = markdown(fig)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retained.json").write_text(json.dumps(fig, indent=1))
        (args.out / "retained.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

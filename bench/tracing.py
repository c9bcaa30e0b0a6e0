"""What tracing costs a run: the three-step no-op workflow with ``tracing:`` off and on (every run sampled).

The same closed loop as ``throughput`` (100 runs in flight) through a worker process whose settings leave
``tracing.endpoint`` unset, and one exporting every span to a real Jaeger (``calmrun.devjaeger``, built
by ``make tools``) over OTLP/HTTP. A traced run of ``lin`` makes 17 spans: the run, 4 decisions, and 3
attempts with their queue, execute and commit spans. The figures: runs/s,
worker CPU per run, and the run's p50 latency, each off and on, the
rounds of the two interleaved; the overhead is CPU on minus CPU off, round by round. What tracing off
costs is below the CPU measure's resolution, so it is timed in-process: the no-op hooks as a run calls them.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Ctx, Proc, summary
from bench.driver import Loop, closed_loop, latency_summary, start_worker, timings
from calmrun.devjaeger import DevJaeger
from calmrun.tracing import NO_TRACING
from calmrun.workflow.events import StepResult, StepTask

OFF, ON = "off", "on (every run sampled, exported to Jaeger)"


def _metrics(loops: list[Loop], label: str) -> dict[str, Any]:
    return {
        f"runs/s, tracing {label}": summary([lp.runs_per_s for lp in loops]),
        f"worker CPU us/run, tracing {label}": summary([lp.cpu_us_per_run for lp in loops]),
        f"run p50 ms, tracing {label}": summary([lp.timings["run p50 ms"] for lp in loops]),
    }


async def hooks_off_us(runs: int) -> float:
    """Microseconds per run spent in the hooks with tracing off, called as a run of ``lin`` calls them:
    4 decisions, 3 tasks' headers, 3 attempts (each awaited through ``Tracing.attempt``)."""
    task = StepTask(
        run_id="r", workflow="lin", version="1", step="s1", attempt=1, agent="a", issued_ms=0, timeout_s=1.0
    )
    result = StepResult(run_id="r", step="s1", attempt=1, at_ms=0)

    async def attempt() -> StepResult:
        return result

    t, started = NO_TRACING, time.perf_counter()
    for _ in range(runs):
        for _ in range(4):
            t.decision(None, None, result, None, ())  # type: ignore[arg-type]
        for _ in range(3):
            t.task_headers(task)
            await t.attempt(task, attempt)
    baseline = time.perf_counter()
    for _ in range(runs):
        for _ in range(3):
            await attempt()  # what the attempt costs without the hook around it
    return ((baseline - started) - (time.perf_counter() - baseline)) / runs * 1e6


async def run(ctx: Ctx) -> dict[str, Any]:
    n, warm = ctx.n(3_000, 60), ctx.n(300, 10)
    loops: dict[str, list[Loop]] = {OFF: [], ON: []}
    with DevJaeger() as jaeger:
        workers: dict[str, tuple[Proc, str]] = {}
        try:
            workers[OFF] = await start_worker(ctx, "troff", max_in_flight=100)
            workers[ON] = await start_worker(ctx, "tron", max_in_flight=100, tracing=jaeger.otlp_endpoint)
            for _, pfx in workers.values():
                await closed_loop(ctx, pfx, "warm", warm, min(100, warm))
            for r in range(ctx.rounds):  # interleaved: both see the same machine, round by round
                for label, (proc, pfx) in workers.items():
                    loop = await closed_loop(ctx, pfx, f"r{r}", n, 100, proc.pid)
                    loop.timings = latency_summary(await timings(ctx, pfx, loop.run_ids), loop.client_ms)
                    loops[label].append(loop)
        finally:
            for proc, _ in workers.values():
                await proc.stop()
    metrics = _metrics(loops[OFF], OFF) | _metrics(loops[ON], ON)
    hooks = [await hooks_off_us(ctx.n(100_000, 1_000)) for _ in range(ctx.rounds)]
    metrics["tracing off: us/run in the hooks (timed in-process)"] = summary(hooks)
    overhead = [b.cpu_us_per_run - a.cpu_us_per_run for a, b in zip(loops[OFF], loops[ON], strict=True)]
    metrics["tracing overhead: worker CPU us/run, on - off (same round)"] = summary(overhead)
    return {"params": {"runs": n, "warmup_runs": warm, "runs_in_flight": 100, "steps": 3}, "metrics": metrics}

"""What tracing costs a run: the three-step no-op workflow with ``tracing:`` off, then on (all runs sampled).

The same closed loop as ``throughput`` (100 runs in flight) through a worker process whose settings leave
``tracing.endpoint`` unset, then one exporting every span to a real Jaeger (``calmrun.devjaeger``, built
by ``make tools``) over OTLP/HTTP. A traced run of ``lin`` makes 17 spans: the run, 4 decisions, and 3
attempts with their queue, execute and commit spans. The figures: runs/s,
worker CPU per run, and the run's p50 latency, each off and on; the overhead is CPU on minus CPU off.
"""

from __future__ import annotations

from typing import Any

from bench.common import Ctx, summary
from bench.driver import Loop, measure
from calmrun.devjaeger import DevJaeger


def _metrics(loops: list[Loop], label: str) -> dict[str, Any]:
    return {
        f"runs/s, tracing {label}": summary([lp.runs_per_s for lp in loops]),
        f"worker CPU us/run, tracing {label}": summary([lp.cpu_us_per_run for lp in loops]),
        f"run p50 ms, tracing {label}": summary([lp.timings["run p50 ms"] for lp in loops]),
    }


async def run(ctx: Ctx) -> dict[str, Any]:
    n, warm = ctx.n(3_000, 60), ctx.n(300, 10)
    off, _ = await measure(ctx, "troff", n=n, concurrency=100, warmup=warm, max_in_flight=100)
    with DevJaeger() as jaeger:
        on, _ = await measure(
            ctx, "tron", n=n, concurrency=100, warmup=warm, max_in_flight=100, tracing=jaeger.otlp_endpoint
        )
    metrics = _metrics(off, "off") | _metrics(on, "on (every run sampled, exported to Jaeger)")
    cpu_off = metrics["worker CPU us/run, tracing off"]["median"]
    cpu_on = metrics["worker CPU us/run, tracing on (every run sampled, exported to Jaeger)"]["median"]
    metrics["tracing overhead: worker CPU us/run, on - off"] = summary([cpu_on - cpu_off])
    return {"params": {"runs": n, "warmup_runs": warm, "runs_in_flight": 100, "steps": 3}, "metrics": metrics}

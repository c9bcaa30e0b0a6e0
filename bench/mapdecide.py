"""The decider's cost per decision for a wide map: ``python -m bench.mapdecide [--width N] [--concurrency C]``
(also ``python -m bench --only map-decider``). Pure: no broker.

A run of ``extract -> match (map over N lines, C at a time) -> reconcile`` is decided to the end, every
element answered at once in index order; prints the decisions, the mean and the slowest decision, and
the size of the run state at its widest (JSON and Avro), the state a worker writes after each decision.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import Ctx, summary
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequested, StepResult
from calmrun.workflow.state import RunState


def measure(width: int, concurrency: int) -> dict[str, Any]:
    wf = parse_workflow(
        {
            "name": "mapbench",
            "steps": [
                {"name": "extract", "agent": "x", "next": "match"},
                {
                    "name": "match",
                    "kind": "map",
                    "for_each": "steps.extract.lines",
                    "agent": "m",
                    "max_concurrency": concurrency,
                    "max_elements": width,
                    "max_element_bytes": 128,
                    "next": "reconcile",
                },
                {"name": "reconcile", "agent": "r"},
            ],
        }
    )
    codec = RecordCodec(wire_models())
    times: list[float] = []
    widest: RunState | None = None

    def step(state: RunState | None, inp: Any) -> RunState:
        t0 = time.perf_counter()
        d = decide(wf, state, inp)
        times.append(time.perf_counter() - t0)
        assert d.state is not None and d.ignored is None, d.ignored
        return d.state

    s = step(None, RunRequested("r", "mapbench", {}, 1000))
    s = step(
        s,
        StepResult(
            "r", "extract", 1, 1001, output={"lines": [{"sku": f"s{i}", "qty": 1} for i in range(width)]}
        ),
    )
    at = 1002
    for i in range(width):
        at += 1
        s = step(s, StepResult("r", "match", 1, at, output={"index": i, "matched": True}, element=i))
        if i == width - concurrency - 1:
            widest = s
    assert s.steps["match"].status == "succeeded" and s.steps["reconcile"].status == "scheduled"
    widest = widest or s
    per = sorted(times)
    return {
        "width": width,
        "max_concurrency": concurrency,
        "decisions": len(times),
        "total_ms": round(sum(times) * 1000, 1),
        "mean_us": round(sum(times) / len(times) * 1e6, 1),
        "p99_us": round(per[int(len(per) * 0.99) - 1] * 1e6, 1),
        "max_us": round(per[-1] * 1e6, 1),
        "state_json_bytes": len(json.dumps(widest.model_dump(mode="json"))),
        "state_avro_bytes": len(codec.encode(widest)),
    }


async def run(ctx: Ctx) -> dict[str, Any]:
    """One round for ``python -m bench --only map-decider`` (the figures above in the bench's shape)."""
    m = measure(50 if ctx.quick else 1000, 8)
    return {
        "params": {"width": m["width"], "max_concurrency": m["max_concurrency"]},
        "metrics": {
            "decisions": summary([m["decisions"]]),
            "mean us per decision": summary([m["mean_us"]]),
            "p99 us per decision": summary([m["p99_us"]]),
            "widest state JSON bytes": summary([m["state_json_bytes"]]),
            "widest state Avro bytes": summary([m["state_avro_bytes"]]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mapdecide", description=__doc__)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(measure(args.width, args.concurrency), indent=1))


if __name__ == "__main__":
    main()

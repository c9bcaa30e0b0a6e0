"""CPU a worker spends encoding one three-step run's records: the compiled Avro writers against fastavro.

    python -m bench.avro_encode [--runs 300] [--best-of 7]

The bench's workflow (``lin``, three steps, ~200-byte outputs) is decided in process by the pure decider,
as a worker decides it with ``worker.inline_wait_ms`` folding the request and s1's result into one
transaction: every event, task and state the worker writes (one state per transaction, three) is
collected, then encoded with ``AvroCodec.encode`` (compiled, ``calmrun.wire.avrowrite``) and with
``AvroCodec.encode_slow`` (fastavro alone). Prints process CPU µs per run for each, the best of N.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from bench.worker import PAD, STEPS, WORKFLOW
from calmrun.wire.codec import NAMESPACE, RecordCodec, wire_codec
from calmrun.workflow.decider import decide
from calmrun.workflow.events import RunRequested, StepResult
from calmrun.workflow.state import RunState
from tests.runtime_support import linear


def run_records(run_id: str) -> list[BaseModel]:
    """The records one run writes: its events, its tasks, and its state after each of its 3 transactions."""
    wf = linear(WORKFLOW, STEPS, agent="bench_step")
    out: list[BaseModel] = []
    state: RunState | None = None
    inputs: list[Any] = [RunRequested(run_id, WORKFLOW, {"n": 0}, 1_000)]
    inputs += [
        StepResult(run_id, f"s{i}", 1, 1_000 + i, output={"n": i, "label": f"s{i}:1", "pad": PAD})
        for i in range(1, STEPS + 1)
    ]
    for k, inp in enumerate(inputs):
        d = decide(wf, state, inp)
        out += [*d.events, *d.tasks]
        state = d.state
        if k > 0 and state is not None:  # the request and s1's result share a transaction
            out.append(state)
    return out


def avro_item(codec: RecordCodec, record: BaseModel) -> tuple[str, dict[str, Any]]:
    """What ``RecordCodec.encode`` hands to the Avro writer for ``record``: its schema name and dict."""
    name = type(record).__name__
    derived = codec._derived[name]
    data = record.model_dump()
    return f"{NAMESPACE}.{name}", derived.to_avro(data) if derived.to_avro is not None else data


def cpu_us_per_run(encode: Callable[[Any], Any], runs: list[list[Any]], best_of: int) -> float:
    best = float("inf")
    for _ in range(best_of):
        t = time.process_time()
        for records in runs:
            for r in records:
                encode(r)
        best = min(best, (time.process_time() - t) / len(runs) * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.avro_encode")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--best-of", type=int, default=7)
    args = p.parse_args()
    codec = wire_codec()
    runs = [run_records(f"run-{i:07d}") for i in range(args.runs)]
    dumps = [[avro_item(codec, r) for r in rs] for rs in runs]

    def compiled(item: Any) -> bytes:
        return codec.avro.encode(*item)

    def fastavro(item: Any) -> bytes:
        return codec.avro.encode_slow(*item)

    assert all(compiled(x) == fastavro(x) for rs in dumps for x in rs)
    kinds: dict[str, int] = {}
    for r in runs[0]:
        kinds[type(r).__name__] = kinds.get(type(r).__name__, 0) + 1
    print(
        json.dumps(
            {
                "records per run": kinds,
                "bytes per run": sum(len(compiled(x)) for x in dumps[0]),
                "compiled us/run": round(cpu_us_per_run(compiled, dumps, args.best_of), 1),
                "fastavro us/run": round(cpu_us_per_run(fastavro, dumps, args.best_of), 1),
                "record encode us/run (model_dump + compiled)": round(
                    cpu_us_per_run(codec.encode, runs, args.best_of), 1
                ),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Where a run's milliseconds go, one run at a time:
``python -m bench.timeline [--bootstrap B] [--runs 100] [--warmup 20] [--worker-opt K=V ...]``.

Starts a broker (unless ``--bootstrap``) and one ``bench.worker`` with ``bench.timeline_hooks`` preloaded,
sends the bench workflow's runs one at a time as ``bench.driver`` does (the terminal event read
``read_committed``), and prints per stage the median ms from the client's send, and the median ms from
the stage before (per run): the request acknowledged to the client (acks=all), the worker fetching it,
each decision, each step attempt, the inline wait, each of the run's transactions (begin, every request of
its producer sent and answered, committed), the client reading ``run.completed``. A request sent again (a
refused AddPartitionsToTxn: CONCURRENT_TRANSACTIONS, "busy") is timed at its last sending. The last line
counts the transactions of the run's partition that carried no decision of it while it ran (offsets
only: they hold its next transaction back). ``--worker-opt`` passes ``bench.worker`` options.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.common import PARTITIONS, Ctx, loadavg, on_a_broker
from bench.driver import LIN, TERMINAL, run_client, start_worker
from calmrun.kafka.topics import Topics, partition_for
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunRequest

HOOKS = Path(__file__).resolve().parent / "timeline_hooks.py"


async def one_at_a_time(ctx: Ctx, pfx: str, tag: str, n: int) -> list[tuple[str, int, int, int]]:
    """``n`` runs, each sent once the last one's end was read: (run ID, sent, acknowledged, read ns)."""
    codec = RecordCodec(wire_models())
    topics = Topics(pfx)
    out = []
    async with run_client(ctx, topics) as (producer, consumer):
        for i in range(n):
            rid = f"{tag}-{i:07d}"
            req = RunRequest(workflow=LIN.workflow, run_id=rid, input=LIN.make_input(i))
            sent = time.monotonic_ns()
            ack = await producer.send(topics.requests, codec.encode(req), key=rid.encode())
            await ack
            acked = time.monotonic_ns()
            done = False
            while not done:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for rec in records:
                        if dict(rec.headers).get("type") in TERMINAL and rec.key == rid.encode():
                            done = True
            out.append((rid, sent, acked, time.monotonic_ns()))
    return out


def stages(runs: list[tuple[str, int, int, int]], marks: list[list[Any]]) -> dict[str, Any]:
    """Per run, the labelled moments of its path (ms after its send); see the module docstring."""
    by_run: dict[str, list[list[Any]]] = defaultdict(list)
    offset_only: list[tuple[int, int]] = []  # (ns, partition) of transactions with no decision
    for m in marks:
        t, what, ids, detail = m
        if what == "txn begin" and not ids:
            offset_only.append((t, int(detail.split()[0])))
        for rid in set(ids):
            by_run[rid].append(m)
    per: dict[str, list[float]] = defaultdict(list)
    order: dict[str, list[float]] = defaultdict(list)
    steps: dict[str, list[float]] = defaultdict(list)
    counts: Counter[str] = Counter()
    extra: list[int] = []
    for rid, sent, acked, read in runs:
        seen: dict[str, float] = {}
        txn = 0
        for t, what, _ids, detail in sorted(by_run.get(rid, [])):
            if what == "txn begin":
                txn += 1
                label = f"txn{txn} begin"
                counts[f"{label} offsets"] += int(detail.split()[2])
            elif what == "txn committed":
                label = f"txn{txn} committed"
            elif what.startswith("req"):
                name = detail.split()[0]
                label = f"txn{txn} {name} {'sent' if what == 'req sent' else 'answered'}"
                counts[label] += 1
                counts[f"txn{txn} {name} busy"] += "busy" in detail
                if label in seen:  # a retry: keep the last
                    seen[label] = (t - sent) / 1e6
                    continue
            else:
                label = f"{what} {detail}"
            seen.setdefault(label, (t - sent) / 1e6)
        seen["client: request acknowledged"] = (acked - sent) / 1e6
        seen["client read the end"] = (read - sent) / 1e6
        p = partition_for(rid, PARTITIONS)
        extra.append(sum(1 for t, q in offset_only if q == p and sent <= t <= read))
        ranked = sorted(seen.items(), key=lambda kv: kv[1])
        prev = 0.0
        for label, ms in ranked:
            per[label].append(ms)
            steps[label].append(ms - prev)
            prev = ms
            order[label].append(ms)
    return {"per": per, "steps": steps, "counts": counts, "offset_only": extra, "runs": len(runs)}


def table(s: dict[str, Any]) -> str:
    per, steps, counts = s["per"], s["steps"], s["counts"]
    rows = sorted(per, key=lambda k: statistics.median(per[k]))
    lines = [f"{'stage':<44} {'runs':>5} {'from send':>10} {'from prev':>10}  requests/run"]
    for label in rows:
        n = len(per[label])
        sent = counts.get(label, 0)
        busy = counts.get(label.rsplit(" ", 1)[0].replace(" answered", "") + " busy", 0)
        req = f"{sent / n:.2f}" + (f" ({busy / n:.2f} busy)" if busy else "") if sent else ""
        if label.endswith("begin"):
            req = f"{counts.get(label + ' offsets', 0) / n:.2f} input offsets"
        lines.append(
            f"{label:<44} {n:>5} {statistics.median(per[label]):>10.2f}"
            f" {statistics.median(steps[label]):>10.2f}  {req}"
        )
    extra = s["offset_only"]
    lines.append(f"offset-only txns of its partition during a run: {statistics.mean(extra):.2f}")
    return "\n".join(lines)


async def run(args: argparse.Namespace, ctx: Ctx) -> None:
    marks_path = Path(tempfile.mkdtemp(prefix="calmrun-timeline-")) / "marks.jsonl"
    os.environ["CALMRUN_TIMELINE"] = str(marks_path)
    opts: dict[str, Any] = dict(kv.split("=", 1) for kv in args.worker_opt)
    proc, pfx = await start_worker(ctx, "tl", preload=str(HOOKS), **opts)
    try:
        load = loadavg()
        await one_at_a_time(ctx, pfx, "warm", args.warmup)
        runs = await one_at_a_time(ctx, pfx, "r", args.runs)
        await proc.stop()
    finally:
        proc.kill()
    marks = [json.loads(line) for line in marks_path.read_text().splitlines()]
    print(f"load {load} -> {loadavg()}, {args.runs} runs one at a time, worker options {opts}")
    print(table(stages(runs, marks)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.timeline")
    p.add_argument("--bootstrap", help="use this broker instead of starting one")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--worker-opt", action="append", default=[], help="K=V: a bench.worker option")
    p.add_argument("--out", default="/tmp/calmrun-bench-timeline")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_a_broker(args.bootstrap, lambda b: run(args, Ctx(bootstrap=b, out=out)), "timeline")


if __name__ == "__main__":
    main()

"""Where a run's milliseconds go, one run at a time (or ``--in-flight N``): ``python -m bench.timeline
[--bootstrap B] [--runs 100] [--warmup 20] [--in-flight 1] [--worker-opt K=V ...]``.

Starts a broker (unless ``--bootstrap``) and one ``bench.worker`` with ``bench.timeline_hooks`` preloaded,
sends the bench workflow's runs one at a time as ``bench.driver`` does (the terminal event read
``read_committed``), and prints per stage the median ms from the client's send, and the median ms from
the stage before (per run): the request acknowledged to the client (acks=all), the worker fetching it,
each decision, each step attempt, the inline wait, each of the run's transactions (begin, every request of
its producer sent and answered, committed), the client reading ``run.completed``. A request sent again (a
refused AddPartitionsToTxn: CONCURRENT_TRANSACTIONS, "busy") is timed at its last sending. Then the
offset-only transactions begun while a run ran (they hold its next transaction back), and the writer's
transactions: decisions in each, begin -> records sent -> committed, and begin to next begin.
``--in-flight N`` keeps N runs in flight instead (a new one sent as one's end is read): where the time of
a hop goes under load. ``--worker-opt`` passes ``bench.worker`` options.
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

from bench.common import Ctx, loadavg, on_a_broker, pct
from bench.driver import LIN, TERMINAL, run_client, start_worker
from calmrun.kafka.topics import Topics
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


async def in_flight(ctx: Ctx, pfx: str, tag: str, n: int, k: int) -> list[tuple[str, int, int, int]]:
    """``n`` runs, ``k`` in flight (one sent as one's end is read), as ``one_at_a_time`` returns them."""
    codec = RecordCodec(wire_models())
    topics = Topics(pfx)
    ids = [f"{tag}-{i:07d}" for i in range(n)]
    sent: dict[str, int] = {}
    acked: dict[str, int] = {}
    out: list[tuple[str, int, int, int]] = []
    async with run_client(ctx, topics) as (producer, consumer):

        async def submit(rids: list[str]) -> None:
            for rid in rids:
                req = RunRequest(workflow=LIN.workflow, run_id=rid, input=LIN.make_input(len(sent)))
                sent[rid] = time.monotonic_ns()
                ack = await producer.send(topics.requests, codec.encode(req), key=rid.encode())
                ack.add_done_callback(lambda _f, r=rid: acked.setdefault(r, time.monotonic_ns()))

        await submit(ids[:k])
        queued = ids[k:]
        while len(out) < n:
            batch = await consumer.getmany(timeout_ms=1000)
            ended = []
            for records in batch.values():
                for rec in records:
                    rid = (rec.key or b"").decode()
                    if dict(rec.headers).get("type") in TERMINAL and rid in sent:
                        ended.append(rid)
                        out.append((rid, sent[rid], acked.get(rid, sent[rid]), time.monotonic_ns()))
            more, queued = queued[: len(ended)], queued[len(ended) :]
            await submit(more)
    return out


def stages(runs: list[tuple[str, int, int, int]], marks: list[list[Any]]) -> dict[str, Any]:
    """Per run, the labelled moments of its path (ms after its send); see the module docstring."""
    by_run: dict[str, list[list[Any]]] = defaultdict(list)
    offset_only: list[int] = []  # ns of transactions with no decision
    txns: list[tuple[int, str, int]] = []  # (ns, what, decisions) of each transaction's begin, send, commit
    for m in marks:
        t, what, ids, detail = m
        if what == "txn begin" and not ids:
            offset_only.append(t)
        if what.startswith("txn "):
            txns.append((t, what, len(ids)))
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
        extra.append(sum(1 for t in offset_only if sent <= t <= read))
        ranked = sorted(seen.items(), key=lambda kv: kv[1])
        prev = 0.0
        for label, ms in ranked:
            per[label].append(ms)
            steps[label].append(ms - prev)
            prev = ms
            order[label].append(ms)
    return {
        "per": per,
        "steps": steps,
        "counts": counts,
        "offset_only": extra,
        "runs": len(runs),
        "txns": cycles(txns, runs[0][1], max(r[3] for r in runs)) if runs else {},
    }


def cycles(txns: list[tuple[int, str, int]], t0: int, t1: int) -> dict[str, list[float]]:
    """The writer's transactions begun between ``t0`` and ``t1`` (ns): decisions in each, ms from its begin
    to its records sent and to its commit, and from one begin to the next. The writer takes a transaction
    only after the last one's records were written (``streams.txn``), so a begin and the send before it
    never overlap; ``sent -> committed`` is the commit round trip, with the next one's send beside it."""
    out: dict[str, list[float]] = defaultdict(list)
    begun: list[tuple[int, int]] = []  # (ns, decisions) of each begin
    sends: list[int] = []
    commits: list[int] = []
    for t, what, n in sorted(txns):
        if what == "txn begin":
            begun.append((t, n))
        elif what == "txn sent":
            sends.append(t)
        elif what == "txn committed":
            commits.append(t)
    for i, (t, n) in enumerate(begun):  # the i-th begin, send and commit are one transaction's (in order)
        if not t0 <= t <= t1 or i >= len(sends) or i >= len(commits):
            continue
        out["decisions"].append(n)
        out["begin -> sent"].append((sends[i] - t) / 1e6)
        out["sent -> committed"].append((commits[i] - sends[i]) / 1e6)
        if i + 1 < len(begun):
            out["begin -> next begin"].append((begun[i + 1][0] - t) / 1e6)
    return out


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
    lines.append(f"offset-only transactions during a run: {statistics.mean(extra):.2f}")
    txns = s["txns"]
    if txns.get("decisions"):
        lines.append(f"transactions while the runs ran: {len(txns['decisions'])}; p50 / p90 each")
        for k, v in txns.items():
            lines.append(f"  {k:<24} {statistics.median(v):>8.2f} {pct(v, 90):>8.2f}")
    return "\n".join(lines)


async def run(args: argparse.Namespace, ctx: Ctx) -> None:
    marks_path = Path(tempfile.mkdtemp(prefix="calmrun-timeline-")) / "marks.jsonl"
    os.environ["CALMRUN_TIMELINE"] = str(marks_path)
    opts: dict[str, Any] = dict(kv.split("=", 1) for kv in args.worker_opt)
    proc, pfx = await start_worker(ctx, "tl", preload=str(HOOKS), **opts)
    try:
        load = loadavg()
        if args.in_flight > 1:
            await in_flight(ctx, pfx, "warm", args.warmup, args.in_flight)
            runs = await in_flight(ctx, pfx, "r", args.runs, args.in_flight)
        else:
            await one_at_a_time(ctx, pfx, "warm", args.warmup)
            runs = await one_at_a_time(ctx, pfx, "r", args.runs)
        await proc.stop()
    finally:
        proc.kill()
    marks = [json.loads(line) for line in marks_path.read_text().splitlines()]
    how = f"{args.in_flight} in flight" if args.in_flight > 1 else "one at a time"
    span_s = (max(r[3] for r in runs) - min(r[1] for r in runs)) / 1e9
    how += f", {len(runs) / span_s:.1f} runs/s"
    print(f"load {load} -> {loadavg()}, {args.runs} runs {how}, worker options {opts}")
    print(table(stages(runs, marks)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.timeline")
    p.add_argument("--bootstrap", help="use this broker instead of starting one")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--in-flight", type=int, default=1, help="runs in flight (1: one at a time)")
    p.add_argument("--worker-opt", action="append", default=[], help="K=V: a bench.worker option")
    p.add_argument("--out", default="/tmp/calmrun-bench-timeline")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_a_broker(args.bootstrap, lambda b: run(args, Ctx(bootstrap=b, out=out)), "timeline")


if __name__ == "__main__":
    main()

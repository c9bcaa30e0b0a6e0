"""``python -m bench [--quick] [--only NAME ...] [--peers] [--skip-confluent] [--profile] [--bootstrap B]``.

Starts the project's KRaft broker on a free port (unless ``--bootstrap`` names one), runs the workloads,
writes ``results.json`` and ``results.md`` to the output directory, prints the table and stops the broker.
``--peers`` (``make bench-peers``) also installs Restate and DBOS and runs them on the same workload right
after ``throughput`` (``bench.peers``); the ratios then come from that run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import (
    aggregator,
    floor,
    journal,
    mapdecide,
    memory,
    pools,
    replay,
    scaling,
    status,
    tracing,
    ui,
    workflow,
)
from bench.common import ROOT, WARMUP, Ctx, loadavg
from bench.peers import compare
from bench.speed import UNIT_METRIC, Sampler
from calmrun.devkafka import KAFKA_VERSION, DevKafka
from calmrun.localproc import free_port

Workload = Callable[[Ctx], Awaitable[dict[str, Any]]]
WORKLOADS: dict[str, Workload] = {
    "floor": floor.run,
    "throughput": workflow.throughput,
    "latency": workflow.latency,
    "processes": scaling.processes,
    "triage": scaling.triage,
    "replay": replay.run_replay,
    "costs": replay.run_costs,
    "memory": memory.run,
    "status": status.run,
    "ui": ui.run,
    "aggregator": aggregator.run,
    "pools-hop": pools.hop,
    "pools-slow": pools.slow,
    "map-decider": mapdecide.run,
    "journal": journal.run,
}
OPTIONAL: dict[str, Workload] = {"peers": compare.run, "tracing": tracing.run}
"""Not run by default: ``peers`` installs other engines (``--peers``); ``tracing`` needs Jaeger (``make
tools``): ``python -m bench --only tracing``."""


def machine() -> dict[str, Any]:
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    versions = {"python": platform.python_version(), "kafka": KAFKA_VERSION}
    for dist in ("calmrun", "aiokafka", "confluent-kafka", "fastavro", "pydantic"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "versions": versions,
    }


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The ratios the issue asks for, from medians, when both sides were measured in this run."""
    out: dict[str, float] = {}
    fl = results.get("floor", {}).get("metrics", {})
    th = results.get("throughput", {}).get("metrics", {})
    fwd = fl.get("aiokafka records/s", {}).get("median")
    if fwd and th:
        out["workflow step hops/s / aiokafka forwarder records/s"] = th["step hops/s"]["median"] / fwd
        out["workflow records moved/s / aiokafka forwarder records moved/s (2 per record)"] = th[
            "records moved/s"
        ]["median"] / (2 * fwd)
    fcpu = fl.get("aiokafka CPU us/record", {}).get("median")
    if fcpu and th:
        out["worker CPU us per step hop / aiokafka forwarder CPU us per record"] = (
            th["worker CPU us/run"]["median"] / 3 / fcpu
        )
    peers = results.get("peers", {}).get("metrics", {})
    lat = results.get("latency", {}).get("metrics", {})
    for engine in ("Restate", "DBOS"):  # measured in this run, right after calmrun's throughput
        if th and f"{engine} runs/s" in peers:
            out[f"calmrun runs/s / {engine} runs/s (100 in flight)"] = (
                th["runs/s"]["median"] / peers[f"{engine} runs/s"]["median"]
            )
        ours, theirs = th.get(UNIT_METRIC), peers.get(f"{engine} {UNIT_METRIC}")
        if ours and theirs:  # the machine's speed in each engine's loop: above 1, theirs ran slower
            out[f"machine: bench.speed unit in {engine}'s loop / in calmrun's (100 in flight)"] = (
                theirs["median"] / ours["median"]
            )
        p50 = peers.get(f"{engine} client p50 ms, light (1 in flight)")
        if p50 and "client p50 ms, light (1 in flight)" in lat:
            out[f"calmrun client p50 ms / {engine}'s, light (1 in flight)"] = (
                lat["client p50 ms, light (1 in flight)"]["median"] / p50["median"]
            )
    for name in ("processes", "triage"):
        m = results.get(name, {}).get("metrics", {})
        one, two = m.get("runs/s (1 process)"), m.get("runs/s (2 processes)")
        if one and two:
            out[f"{name}: runs/s with 2 worker processes / with 1"] = two["median"] / one["median"]
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    lines = [
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB; {v}.",
        f"Load average (1/5/15 min) at start {m['loadavg_start']}, at end {m['loadavg_end']}: a value above "
        f"{m['cores']} means other processes competed for the cores during the run.",
        f"Command: `{report['command']}`; {report['rounds']} measured rounds after a warm-up; "
        "median and min-max over the rounds.",
        "",
        "| workload | metric | median | min - max | spread |",
        "|---|---|---:|---:|---:|",
    ]
    for name, res in report["results"].items():
        for metric, s in res.get("metrics", {}).items():
            lines.append(
                f"| {name} | {metric} | {_fmt(s['median'])} | {_fmt(s['min'])} - {_fmt(s['max'])} "
                f"| +-{s['spread_pct']:.0f}% |"
            )
    if report["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {val:.2f} |" for k, val in report["ratios"].items()]
    notes = [n for res in report["results"].values() for n in res.get("notes", [])] + report["notes"]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


async def run_all(ctx: Ctx, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.monotonic()
        print(f"== {name} ...", flush=True)
        results[name] = await {**WORKLOADS, **OPTIONAL}[name](ctx)
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
        for metric, s in results[name]["metrics"].items():
            print(f"   {metric}: {_fmt(s['median'])} ({_fmt(s['min'])} - {_fmt(s['max'])})", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument(
        "--only", action="append", choices=sorted({*WORKLOADS, *OPTIONAL}), help="run only these"
    )
    parser.add_argument(
        "--peers", action="store_true", help="Restate and DBOS right after throughput (installs them)"
    )
    parser.add_argument("--rounds", type=int, help="measured rounds (default 3, quick 1)")
    parser.add_argument("--skip-confluent", action="store_true", help="floor without confluent-kafka")
    parser.add_argument("--profile", action="store_true", help="pyinstrument profile of the worker")
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = args.only or list(WORKLOADS)
    if args.peers and "peers" not in names:
        if "throughput" not in names:
            names.insert(0, "throughput")
        names.insert(names.index("throughput") + 1, "peers")
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(
        bootstrap=args.bootstrap or "",
        quick=args.quick,
        rounds=args.rounds or (1 if args.quick else 3),
        skip_confluent=args.skip_confluent,
        profile=args.profile,
        out=args.out,
        broker_warmup=0 if args.quick else WARMUP,
    )
    load_start = loadavg()
    kafka = None
    if not args.bootstrap:
        kafka = DevKafka(data_dir=Path(tempfile.mkdtemp(prefix="calmrun-bench-kafka-")), port=free_port())
        kafka.start()
        ctx.bootstrap = kafka.bootstrap
        ctx.broker_pid = kafka.running_pid() or 0
    ctx.speed = args.out / "speed.txt"  # the machine's speed, sampled for the whole run (bench.speed)
    ctx.speed.write_text("")
    try:
        with Sampler(ctx.speed):
            results = asyncio.run(run_all(ctx, names))
    finally:
        if kafka is not None:
            kafka.stop()
        for tmp in args.out.glob(".*.*"):  # helper status files and logs
            tmp.unlink()
    load_end = loadavg()
    report = {
        "command": "python -m bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine(), "loadavg_start": load_start, "loadavg_end": load_end},
        "rounds": ctx.rounds,
        "quick": ctx.quick,
        "results": results,
        "ratios": ratios(results),
        "notes": ctx.notes,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "results.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()

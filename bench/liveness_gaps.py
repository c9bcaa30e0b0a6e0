"""How late a live worker's liveness beats arrive at its peer under load: the margin a ``dead_after_s`` has.

    python -m bench.liveness_gaps --bootstrap B [--runs 3000] [--sleep 0.02] [--in-flight 20] [--hogs 0]

Two worker processes (``tests.worker_proc``, the ``fork`` workflow) with liveness on and ``dead_after_s``
far above any gap (30 s: nobody is removed), ``--runs`` runs submitted at once; ``--hogs`` processes spin
on the CPU meanwhile (a busier machine). Each worker logs every peer beat that came more than two
intervals (0.5 s) after the last; this prints them with the beats expected in the window, and how many
gaps exceeded each threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

from calmrun.client import Client
from calmrun.settings import load_settings
from calmrun.workflow.events import RunRequest
from tests.runtime_support import WorkerProcs

GAP = re.compile(r"beat again after ([0-9.]+) s")
LONGEST = re.compile(r"peers' longest silence ([0-9.]+) s")


def spin(until: float) -> None:
    while time.time() < until:
        pass


async def main(args: argparse.Namespace) -> None:
    prefix = f"lg{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="liveness-gaps-"))
    procs = WorkerProcs(args.bootstrap, prefix, work)
    common = ["--workflow", "fork", "--sleep", str(args.sleep), "--max-in-flight", str(args.in_flight)]
    common += ["--session-timeout", "45", "--liveness", "30"]
    settings = load_settings(kafka={"bootstrap": args.bootstrap, "prefix": prefix})
    hogs: list[multiprocessing.Process] = []
    try:
        for n in ("w1", "w2"):
            procs.start(n, *common, "--instance-id", n)
        end = time.monotonic() + 120
        while not all(procs.status(n).get("owned") for n in ("w1", "w2")):
            assert time.monotonic() < end, "the workers never split the partitions"
            await asyncio.sleep(0.2)
        started = time.monotonic()
        async with Client(settings) as client:
            requests = [RunRequest(workflow="fork", input={"n": i}, run_id=f"g{i}") for i in range(args.runs)]
            for _ in range(args.hogs):
                hog = multiprocessing.Process(target=spin, args=(time.time() + 3600,), daemon=True)
                hog.start()
                hogs.append(hog)
            ids = await client.submit_many(requests)
            await client.wait_terminal(ids, wait_s=600)
        took = time.monotonic() - started
    finally:
        for hog in hogs:
            hog.kill()
        for n in ("w1", "w2"):
            procs.terminate(n)  # a clean stop logs the longest silence seen
        procs.kill_all()
    gaps = sorted(
        float(m.group(1)) for n in ("w1", "w2") for m in GAP.finditer((work / f"{n}.log").read_text())
    )
    expected = round(2 * took / 0.25)
    print(
        f"{args.runs} runs in {took:.1f} s, load average {os.getloadavg()[0]:.1f}, hogs {args.hogs}: "
        f"about {expected} beats read by the peers; {len(gaps)} came over 0.5 s late"
    )
    for limit in (0.5, 0.75, 1.0, 1.5, 2.0):
        print(f"  gaps over {limit} s: {sum(1 for g in gaps if g > limit)}")
    longest = [m.group(1) for n in ("w1", "w2") for m in LONGEST.finditer((work / f"{n}.log").read_text())]
    print(f"  longest: {gaps[-5:]}; each worker's longest silence of its peer: {longest} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.liveness_gaps")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--runs", type=int, default=3000)
    p.add_argument("--sleep", type=float, default=0.02)
    p.add_argument("--in-flight", type=int, default=20)
    p.add_argument("--hogs", type=int, default=0, help="processes spinning on the CPU meanwhile")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

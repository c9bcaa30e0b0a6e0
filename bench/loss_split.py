"""A broker loss's pause, split into the broker's share and the client's.

    python bench/loss_split.py --cluster DIR [--trials 3] [--role leader|txn] [--hint]

On a running local cluster (``python -m calmrun.devkafka start --brokers 3 --data-dir DIR``) one transactional
producer, made as a worker's partition writer is (``calmrun.streams.clients.transactional_producer``), commits
one small transaction after another to partition 0 of a topic of its own (replication factor 3). Each trial
kills -9 the node leading that partition (``--role leader``) or coordinating the producer's transactions
(``--role txn``), keeps it down until the producer has committed again (at most 40 s), then restarts it and
waits for full ISRs. It reports, from the kill:

- **fenced**: the controller's ``Fencing broker N ... because its session has timed out`` line (the survivors'
  ``server.log``, broker time);
- **elected**: when the metadata (asked of a live node every 50 ms) first names another leader, or the
  coordinator lookup another coordinator;
- **produced**: the producer's first acknowledged record after the last commit before its longest pause
  between two commits around the kill;
- **written**: the end of that pause (its first commit after the kill);
- the client's share: produced - elected (finding the new leader: metadata, retries); and the commit after
  it: written - produced (the transaction's end: replication to the in-sync follower, the markers).

``--hint``: when ``elected`` is seen, the producer's client is told at once to read the metadata again
(``client.force_metadata_update()``), as a watch that sees the leaders move could do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any


def fenced_at(cluster: Any, node: int, after: float) -> float | None:
    """When a surviving controller logged that it fenced ``node`` (epoch seconds), after ``after``."""
    pattern = re.compile(rf"^\[([\d-]+ [\d:]+,\d+)\] INFO .*Fencing broker {node} at epoch")
    found = []
    for n, kafka in cluster.nodes.items():
        log = Path(kafka.data_dir) / "server.log"
        if n == node or not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines()[-5000:]:
            m = pattern.match(line)
            if m:
                at = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at > after:
                    found.append(at)
    return min(found, default=None)


async def trial(
    cluster: Any, settings: Any, topic: str, role: str, hint: bool, trace: list[tuple[float, str]] | None
) -> dict[str, Any]:
    from aiokafka.admin import AIOKafkaAdminClient

    from calmrun.streams import clients
    from calmrun.streams.txn import transactional_id

    tid = transactional_id(settings.group_id, 0)
    producer = clients.transactional_producer(settings, 0)
    await producer.start()
    commits: list[float] = []
    sends: list[float] = []
    stop = asyncio.Event()

    async def write() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a failed transaction is retried: the pause is measured
                async with producer.transaction():
                    await (await producer.send(topic, b"x", partition=0))
                    sends.append(time.time())
                commits.append(time.time())

    writer = asyncio.create_task(write())
    await asyncio.sleep(3)
    target = (
        (await cluster.leaders([topic])) if role == "leader" else {await cluster.txn_coordinator(tid): []}
    )
    node = next(n for n, parts in target.items() if role != "leader" or (topic, 0) in parts)
    await asyncio.to_thread(cluster.kill9, node)
    killed = time.time()
    elected = None
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.live_bootstrap(), request_timeout_ms=2_000)
    await admin.start()
    try:
        while time.time() - killed < 40:
            with contextlib.suppress(Exception):
                if role == "leader":
                    (t,) = await admin.describe_topics([topic])
                    now = t["partitions"][0]["leader"]
                else:
                    now = await admin.find_coordinator(tid, 1)
                if elected is None and now not in (node, -1):
                    elected = time.time()
                    if hint:
                        producer.client.force_metadata_update()
            if elected is not None and commits and commits[-1] > elected:
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer, 10)
    with contextlib.suppress(Exception):
        await producer.stop()
    around = [t for t in commits if killed - 2 < t]
    gaps = list(itertools.pairwise(around))
    paused, written = max(gaps, key=lambda ab: ab[1] - ab[0]) if gaps else (None, None)
    produced = min((t for t in sends if paused is not None and t > paused), default=None)
    fenced = fenced_at(cluster, node, killed)
    await asyncio.to_thread(cluster.restart, node)
    await asyncio.to_thread(cluster.wait_healthy, 180)

    def since(at: float | None) -> float | None:
        return None if at is None else round(at - killed, 2)

    if trace is not None:
        kinds: dict[str, list[float]] = {}
        for at, msg in trace:
            kinds.setdefault(re.sub(r"\d+", "N", msg)[:110], []).append(round(at - killed, 2))
        for msg, ats in sorted(kinds.items(), key=lambda kv: kv[1][0]):
            print(f"  {ats[0]:7.2f} .. {ats[-1]:7.2f} x{len(ats)} {msg}")
    return {
        "role": role,
        "node": node,
        "fenced": since(fenced),
        "elected": since(elected),
        "produced": since(produced),
        "written": since(written),
        "client_share": None if produced is None or elected is None else round(produced - elected, 2),
        "commit_after_produce": None if written is None or produced is None else round(written - produced, 2),
    }


async def measure(args: argparse.Namespace) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from calmrun.devkafka.cluster import DevCluster
    from calmrun.settings import load_settings

    cluster = DevCluster(Path(args.cluster))
    prefix = f"split{os.getpid()}"
    topic = f"{prefix}.events"
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 3)])
    await admin.close()
    settings = load_settings(kafka={"bootstrap": cluster.bootstrap, "prefix": prefix})
    results = []
    for _ in range(args.trials):
        trace: list[tuple[float, str]] | None = [] if args.trace else None
        if trace is not None:
            handler = logging.Handler(logging.DEBUG)
            handler.emit = lambda rec, t=trace: t.append((rec.created, rec.getMessage()))  # type: ignore[method-assign]
            logging.getLogger("aiokafka").addHandler(handler)
            logging.getLogger("aiokafka").setLevel(logging.DEBUG)
        r = await trial(cluster, settings, topic, args.role, args.hint, trace)
        print(json.dumps(r), flush=True)
        results.append(r)
    for key in ("fenced", "elected", "produced", "written", "client_share", "commit_after_produce"):
        values = [r[key] for r in results if r[key] is not None]
        if values:
            print(f"{key}: median {statistics.median(values):.2f} s, {min(values):.2f}-{max(values):.2f} s")
    print(f"load average {os.getloadavg()[0]:.1f}; hint {args.hint}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cluster", required=True, help="the data directory of a running DevCluster")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--role", choices=["leader", "txn"], default="leader")
    ap.add_argument("--trace", action="store_true", help="print aiokafka's log messages around the kill")
    ap.add_argument("--hint", action="store_true", help="force the producer's metadata update when elected")
    args = ap.parse_args()
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()

"""What the broker watch costs the brokers, and how soon it sees a broker go.

    python bench/watch_load.py --cluster DIR [--seconds 60] [--code DIR] [--kill NODE] [--stop NODE]

Runs one :class:`~calmrun.streams.brokers.BrokerWatch` (three topics of four partitions, all four owned) on a
running local cluster (``python -m calmrun.devkafka start --brokers 3 --data-dir DIR``) for ``--seconds`` and
counts on the client side what it sends: aiokafka's requests by type (``AIOKafkaConnection.send``), and the
connections and request frames of its own probes (``asyncio.open_connection``); it prints them per second,
with the answer times of the ApiVersions requests when the watch keeps them. ``--code DIR`` imports calmrun
from another checkout (the watch before a change), so both are counted the same way.

``--kill NODE``: halfway through, kill -9 the node and restart it 10 s later; ``--stop NODE``: SIGSTOP it for
10 s instead (a hung broker: the process holds its port and answers nothing). Either prints when the watch's
stall and resume lines came, counted from the fault.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((time.time(), record.getMessage()))


async def measure(args: argparse.Namespace) -> None:
    import aiokafka.conn
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from calmrun.devkafka.cluster import DevCluster
    from calmrun.settings import load_settings
    from calmrun.streams import brokers

    cluster = DevCluster(Path(args.cluster))
    sent: Counter[str] = Counter()
    real_send = aiokafka.conn.AIOKafkaConnection.send

    def send(self: Any, request: Any, *a: Any, **kw: Any) -> Any:
        sent[type(request).__name__] += 1
        return real_send(self, request, *a, **kw)

    aiokafka.conn.AIOKafkaConnection.send = send  # type: ignore[method-assign]
    real_open = asyncio.open_connection

    async def open_connection(*a: Any, **kw: Any) -> Any:
        sent["probe connection"] += 1
        reader, writer = await real_open(*a, **kw)
        real_write = writer.write

        def write(data: Any) -> None:
            sent["probe request"] += 1
            real_write(data)

        writer.write = write  # type: ignore[method-assign]
        return reader, writer

    asyncio.open_connection = open_connection  # type: ignore[assignment]

    prefix = f"wl{os.getpid()}"
    topics = [f"{prefix}.requests", f"{prefix}.events", f"{prefix}.state"]
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, 4, 3) for t in topics])
    await admin.close()
    sent.clear()

    lines = Lines()
    logging.getLogger("calmrun.brokers").addHandler(lines)
    logging.getLogger("calmrun.brokers").setLevel(logging.INFO)
    settings = load_settings(kafka={"bootstrap": cluster.bootstrap, "prefix": prefix})
    watch = brokers.BrokerWatch(settings, topics, lambda: {0, 1, 2, 3}, f"{prefix}-group")
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(5)  # started; counted from here
    sent.clear()
    began = time.monotonic()
    fault_at = None
    if args.kill or args.stop:
        await asyncio.sleep(args.seconds / 2)
        node = args.kill or args.stop
        pid = cluster.pid(node)
        fault_at = time.time()
        if args.kill:
            await asyncio.to_thread(cluster.kill9, node)
        else:
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(10)
        if args.kill:
            await asyncio.to_thread(cluster.restart, node)
        else:
            assert pid is not None
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(max(0.0, args.seconds - (time.monotonic() - began)))
    else:
        await asyncio.sleep(args.seconds)
    took = time.monotonic() - began
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    total = sum(v for k, v in sent.items() if k != "probe connection")
    print(f"watch of {brokers.__file__}: {took:.0f} s, load average {os.getloadavg()[0]:.1f}")
    for name, n in sorted(sent.items()):
        print(f"  {name}: {n} ({n / took:.2f}/s)")
    print(f"  requests: {total} ({total / took:.2f}/s); connections: {sent['probe connection'] / took:.2f}/s")
    times = [t for p in getattr(watch, "probes", {}).values() for t in getattr(p, "_times", ())]
    if times:
        times.sort()
        print(
            f"  ApiVersions answer times (last {len(times)}): "
            f"median {statistics.median(times) * 1000:.1f} ms, "
            f"p99 {times[int(len(times) * 0.99)] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms"
        )
    if fault_at:
        print(f"  fault at {time.strftime('%H:%M:%S', time.localtime(fault_at))}{f'{fault_at % 1:.2f}'[1:]}")
    for at, line in lines.seen:
        after = f" (+{at - fault_at:.1f}s)" if fault_at else ""
        print(f"  {time.strftime('%H:%M:%S', time.localtime(at))}{f'{at % 1:.2f}'[1:]}{after} {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cluster", required=True, help="the data directory of a running DevCluster")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--code", help="import calmrun from this checkout instead")
    ap.add_argument("--kill", type=int, help="kill -9 this node halfway through, restart it 10 s later")
    ap.add_argument("--stop", type=int, help="SIGSTOP this node halfway through, SIGCONT it 10 s later")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()

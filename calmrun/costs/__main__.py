"""``python -m calmrun.costs [--config F] [--bootstrap B] [--prefix P] [--metrics-port N]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calmrun.costs.app import Aggregator
from calmrun.settings import Settings, load_settings

log = logging.getLogger("calmrun.costs")


def run_aggregator(settings: Settings, *, metrics_port: int | None = None) -> None:
    """Run the aggregator in this process until SIGTERM/SIGINT (blocks); ``/metrics`` on ``metrics_port``."""

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        agg = Aggregator(settings)
        server: Any = None
        port = settings.metrics.port if metrics_port is None else metrics_port
        if port:
            from prometheus_client import start_http_server

            server, _ = start_http_server(port, addr=settings.metrics.host, registry=agg.registry)
            log.info("costs: metrics on http://%s:%d/metrics", settings.metrics.host, port)
        try:
            await agg.run(stopping)
        finally:
            if server is not None:
                server.shutdown()

    asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m calmrun.costs``: run the aggregator until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m calmrun.costs", description="The cost aggregator.")
    parser.add_argument("--config")
    parser.add_argument("--bootstrap")
    parser.add_argument("--prefix")
    parser.add_argument("--partitions", type=int)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    kafka = {
        k: v
        for k, v in {
            "bootstrap": args.bootstrap,
            "prefix": args.prefix,
            "partitions": args.partitions,
        }.items()
        if v is not None
    }
    settings = load_settings(Path(args.config) if args.config else None, kafka=kafka)
    run_aggregator(settings, metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()

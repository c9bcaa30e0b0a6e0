"""``calmrun ui``: serve the operator page until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from calmrun.settings import Settings
from calmrun.ui.access import Access
from calmrun.ui.server import UiServer
from calmrun.workflow.definition import WorkflowDef

err = Console(stderr=True)


async def serve(
    settings: Settings,
    definitions: list[WorkflowDef],
    token: str | None = None,
    ready_file: Path | None = None,
    pool_metrics: Sequence[str] = (),
) -> None:
    """Start the page, print its address (and write it to ``ready_file``), serve until a signal.

    Raises:
        UiAccessError: off loopback without authentication.
        BrokerUnavailableError: no broker answers.
    """
    logging.getLogger("calmrun.ui").setLevel(logging.INFO)
    server = UiServer(settings, Access(settings.ui, token), definitions, pool_metrics=pool_metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = await server.start()
    try:
        err.print(f"calmrun ui on {settings.kafka.bootstrap} prefix {settings.kafka.prefix}: {url}")
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, url)
        await server.tail.caught_up(wait_s=3600)
        sizes = server.index.sizes()
        err.print(
            f"index rebuilt from the topics in {server.tail.rebuild_s:.2f}s: {sizes['runs']} runs, "
            f"{sizes['events']} events, {sizes['dlq']} dead letters"
        )
        await stop.wait()
    finally:
        await server.stop()

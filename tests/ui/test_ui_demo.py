"""``python -m calmrun.demo --ui``: the demo prints the operator page's address and leaves it open."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from aiohttp import ClientSession

ROOT = Path(__file__).resolve().parents[2]


async def test_demo_serves_the_operator_page_and_leaves_it_open(broker: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "calmrun.demo",
            "--bootstrap",
            broker,
            "--runs",
            "5",
            "--ui",
            "--ui-port",
            "0",
        ],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: list[str] = []

    async def line_with(text: str, wait_s: float = 180.0) -> str:
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            raw = await asyncio.wait_for(proc.stdout.readline(), max(0.1, end - time.monotonic()))  # type: ignore[union-attr]
            if not raw:
                break
            lines.append(raw.decode(errors="replace"))
            if text in lines[-1]:
                return lines[-1]
        raise AssertionError(f"the demo never printed {text!r}:\n{''.join(lines)[-3000:]}")

    try:
        first = await line_with("operator page: http://127.0.0.1:")
        url = first.split("operator page: ", 1)[1].split()[0]
        await line_with("the operator page stays open at")
        async with ClientSession() as s:
            for i in range(5):
                async with s.get(f"{url}api/runs/ticket-{i:05d}") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["state"]["status"] == "completed"
            async with s.get(url) as resp:
                assert resp.status == 200 and "calmrun" in await resp.text()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""Restate's load generator (peers' venv): POST ``/Lin/<run id>/run`` to the ingress, awaiting each result.

python -m bench.peers.restate_load --ingress http://127.0.0.1:PORT [--runs N --concurrency C ...]
"""

from __future__ import annotations

import asyncio

import aiohttp

from bench.peers import loadgen


async def main() -> None:
    parser = loadgen.parser(__doc__ or "")
    parser.add_argument("--ingress", required=True)
    a = parser.parse_args()
    connector = aiohttp.TCPConnector(limit=a.concurrency + 10)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def call(run_id: str) -> None:
            async with http.post(f"{a.ingress}/Lin/{run_id}/run", json={"n": 0}) as resp:
                body = await resp.json()
                if resp.status != 200 or body.get("n") != 3:
                    raise RuntimeError(f"run {run_id}: HTTP {resp.status} {body}")

        await loadgen.measure_async(a, call)


if __name__ == "__main__":
    asyncio.run(main())

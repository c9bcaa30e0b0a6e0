"""What each tenant spent in its current budget window, from ``<prefix>.costs.tenants``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal

from calmrun.costs.costtopics import CostTopics, ensure_cost_topics
from calmrun.costs.fold import bucket_start
from calmrun.costs.totals import CompactedTail
from calmrun.settings import Settings


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class TenantSpend:
    """What each tenant spent in its current budget window, from ``<prefix>.costs.tenants``.

    A worker starts one (``async with TenantSpend(settings)``) and asks ``spent(tenant, window)`` when a run
    request arrives. The answer lags the tenant's attempts by the aggregator's lag (eventually consistent):
    runs admitted meanwhile can take a tenant past its budget by what they spend in that time.

    Args:
        settings: broker and prefix.
        clock: wall-clock milliseconds; the current window bucket is taken from it.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], int] = wall_ms) -> None:
        self.clock = clock
        self._latest: dict[tuple[str, str, int], tuple[int, Decimal]] = {}
        self._tail = CompactedTail(settings, CostTopics(settings.kafka.prefix).tenants, self._apply)

    def _apply(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            return
        v = json.loads(value)
        k = (str(v["tenant"]), str(v["window"]), int(v["partition"]))
        start = int(v["start_ms"])
        if k not in self._latest or self._latest[k][0] <= start:
            self._latest[k] = (start, Decimal(v["spent_usd"]))

    def spent(self, tenant: str, window: str, at_ms: int | None = None) -> Decimal:
        """The tenant's spend in the ``window`` bucket holding ``at_ms`` (default now), all partitions."""
        start = bucket_start(self.clock() if at_ms is None else at_ms, window)
        return sum(
            (
                usd
                for (t, w, _), (s, usd) in self._latest.items()
                if t == tenant and w == window and s == start
            ),
            Decimal(0),
        )

    async def start(self) -> None:
        """Create the topic when missing, then read it from the beginning and keep following it."""
        await ensure_cost_topics(self._tail.settings)
        await self._tail.start()

    async def caught_up(self, wait_s: float = 30.0) -> None:
        await self._tail.caught_up(wait_s)

    async def stop(self) -> None:
        await self._tail.stop()

    async def __aenter__(self) -> TenantSpend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

"""The worker's room for uncommitted decisions: intake reads no more input while too many wait for their
transaction (``worker.max_unacked``); every writer counts what it holds here."""

from __future__ import annotations

import asyncio


class Gate:
    """Counts decisions not yet committed across all partitions; intake waits while too many are.

    Attributes:
        commits: transactions the writers committed (all partitions, over the worker's life).
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.pending, self.peak, self.commits = limit, 0, 0, 0
        self._room = asyncio.Event()
        self._room.set()

    def add(self, n: int) -> None:
        self.pending += n
        self.peak = max(self.peak, self.pending)
        if self.pending >= self.limit:
            self._room.clear()

    def done(self, n: int) -> None:
        self.pending -= n
        if self.pending < self.limit:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()

"""Committed decisions' callbacks (``on_commit``), run a few per turn of the event loop, in commit order.

Under load one transaction carries a decision of nearly every run in flight, and their callbacks start
each run's next step. Run all in one turn, they kept the loop busy for tens of milliseconds while the next
transaction's records and commit waited behind them: every run moved in one lockstep, and the worker idled
through each commit. A few per turn, the first runs' next decisions go out while the later runs' steps are
still being started (docs/performance.md, "A commit's callbacks, a few per turn").
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable

PER_TURN = 16
"""Callbacks run per turn of the loop: at 100 runs in flight, 16 did about 3 % more runs/s than all at once
(1.033x on the median of 24 paired loops, ``bench.pairs``), 32 less than 16 (docs/performance.md)."""


class AfterCommit:
    """Runs callbacks ``per_turn`` at a time, one batch per turn of the running loop, in the order given.

    Args:
        ran: told once the queue is empty (None), or once a callback raised (its error; the callbacks queued
            after it are dropped: the writer that queued them fails).
        per_turn: callbacks run in one turn.
    """

    def __init__(self, ran: Callable[[BaseException | None], None], per_turn: int = PER_TURN) -> None:
        self._queue: deque[Callable[[], None]] = deque()
        self._ran, self._per_turn = ran, per_turn
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._queue)

    def extend(self, callbacks: Iterable[Callable[[], None]]) -> None:
        """Queue ``callbacks`` after those queued before; the first run in the loop's next turn."""
        self._queue.extend(callbacks)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def run_all(self) -> None:
        """Run every callback still queued, now (the writer closes)."""
        self._run(len(self._queue))

    def _turn(self) -> None:
        if not self._run(self._per_turn):
            return
        if self._queue:
            asyncio.get_running_loop().call_soon(self._turn)
        else:
            self._scheduled = False
            self._ran(None)

    def _run(self, n: int) -> bool:
        """Run the next ``n`` callbacks; False if one raised (told to ``ran``, the rest dropped)."""
        try:
            for _ in range(min(n, len(self._queue))):
                self._queue.popleft()()
        except Exception as exc:
            self._queue.clear()
            self._scheduled = False
            self._ran(exc)
            return False
        return True

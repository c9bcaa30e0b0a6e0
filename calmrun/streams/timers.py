"""When to look at a run again: the index of its durable deadlines and retry times.

The times themselves are in the run states, so they survive any crash; this heap of
``(due_ms, partition, run_id)`` only says when the worker should hand a run a ``TimerFired``. An entry
may be stale (the run moved on); the decider, given the timer, finds nothing due and says so.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator


class Timers:
    """A min-heap of due times per (partition, run)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str]] = []

    def push(self, due_ms: int, p: int, run_id: str) -> None:
        heapq.heappush(self._heap, (due_ms, p, run_id))

    def due(self, now_ms: int) -> Iterator[tuple[int, str]]:
        """Pop and yield (partition, run) of every entry due at ``now_ms``; pushing meanwhile is fine."""
        while self._heap and self._heap[0][0] <= now_ms:
            _, p, run_id = heapq.heappop(self._heap)
            yield p, run_id

    def drop(self, parts: set[int]) -> None:
        """Forget the entries of partitions this worker no longer owns."""
        self._heap = [t for t in self._heap if t[1] not in parts]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

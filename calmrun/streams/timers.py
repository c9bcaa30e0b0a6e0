"""When to look at a run again: the index of its durable deadlines and retry times.

The times themselves are in the run states, so they survive any crash; this heap of
``(due_ms, partition, run_id)`` only says when the worker should hand a run a ``TimerFired``. An entry
may be stale (the run moved on); the decider, given the timer, finds nothing due and says so.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Iterator

from calmrun.workflow.decider import expired
from calmrun.workflow.state import RunState


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

    def fire(
        self,
        now_ms: int,
        live: Callable[[int, str], RunState | None],
        running: Container[str],
        fire: Callable[[int, RunState], None],
    ) -> None:
        """``fire`` every run (still live and owned, per ``live``) whose next due time has come.

        A run whose expired attempt is still ``running`` here (it started late behind a backlog) is
        looked at again a second later: its own timeout will end it.
        """
        for p, run_id in self.due(now_ms):
            state = live(p, run_id)  # a finished run has no timers
            if state is None:
                continue
            due = state.next_due_ms()
            if due is None:
                continue
            if due > now_ms:
                self.push(due, p, run_id)
            elif any(key in running for key in expired(state, now_ms)):
                self.push(now_ms + 1000, p, run_id)
            else:
                fire(p, state)

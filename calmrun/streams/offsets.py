"""Offsets a worker may commit: per partition, just below the oldest record not yet finished.

Records finish out of order (step tasks run concurrently), so committing the last consumed offset could
skip an unfinished one. As Confluent's Parallel Consumer does, the commit position is the first record
still open; a crash re-delivers exactly the unfinished records (and maybe some finished after them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from aiokafka.structs import TopicPartition


@dataclass(frozen=True, slots=True)
class Pending:
    """One consumed input record that is not finished yet: the one owner of "this input is done".

    Made by the intake when it reads a record; ``finish()`` is called once the decision that answers the
    record is in a transaction (a task record: once the decision on its attempt's result is), so the
    offset commits with, or after, that decision.
    """

    tracker: OffsetTracker
    tp: TopicPartition
    offset: int

    def finish(self) -> None:
        self.tracker.finished(self.tp, self.offset)


class OffsetTracker:
    """Tracks consumed and finished offsets per partition."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def consumed(self, tp: TopicPartition, offset: int) -> Pending:
        self._open.setdefault(tp, deque()).append(offset)
        self._done.setdefault(tp, set())
        self._next[tp] = offset + 1
        return Pending(self, tp, offset)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        if tp in self._done:
            self._done[tp].add(offset)

    def to_commit(self) -> dict[TopicPartition, int]:
        """Positions that moved since the last call: the first unfinished offset, or one past the last."""
        out = {}
        for tp, q in self._open.items():
            done = self._done[tp]
            while q and q[0] in done:
                done.discard(q.popleft())
            pos = q[0] if q else self._next[tp]
            if self._committed.get(tp) != pos:
                out[tp] = pos
        return out

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        self._committed.update(positions)

    def consumed_to(self, tp: TopicPartition) -> int | None:
        """The offset after the last record consumed from ``tp``, or None if none since it was assigned."""
        return self._next.get(tp)

    def forget(self, partitions: set[int]) -> None:
        """Drop the partitions a rebalance took away."""
        for tp in [tp for tp in self._open if tp.partition in partitions]:
            for d in (self._open, self._done, self._next, self._committed):
                d.pop(tp, None)

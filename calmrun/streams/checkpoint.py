"""The checkpoint: the one owner of "this input is finished", and the only source of the input offsets a
writer commits.

Records finish out of order (step tasks run concurrently), so committing the last consumed offset could
skip an unfinished one. As Confluent's Parallel Consumer does, the commit position is the first record
still open; a crash re-delivers exactly the unfinished records (and maybe some finished after them).

An input finishes only as the decision answering it enters a transaction: the writer hands the
checkpoint the inputs of the decisions it takes into a transaction and commits the positions it gets back
(``take``), so an offset commits with the decision that answers it, never before. An input answered with
no output of its own (a task record whose attempt's result is decided already) is ``settled``: it finishes
with the next transaction that takes all its writer holds, so with or after that decision.

Lazy inputs: an input whose re-reading after a crash is recognised and ignored (an accepted or duplicate run
request: the run exists; a step result or task record: its attempt is decided) need not commit with its
decision. ``take`` is told which finished inputs are lazy, and says whether the positions it returns may wait
for a later transaction: they may unless one of them passes a strict input (a command, a quarantine, a
move: re-read, it would be applied twice) not committed yet. Settled inputs are lazy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition


@dataclass(frozen=True, slots=True)
class Pending:
    """One consumed input record not finished yet: made by ``Checkpoint.consumed``, finished only by it.

    ``generation``: how often ``tp`` had been given away when it was read; an input read before its partition
    was given away (and maybe taken back since) finishes nothing.
    """

    tp: TopicPartition
    offset: int
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Taken:
    """What a writer commits with the batch it took: the input positions that moved, and whether they may
    wait for a later transaction (no strict input among the records they pass)."""

    positions: dict[TopicPartition, int] = field(default_factory=dict)
    may_wait: bool = True


class Checkpoint:
    """Consumed and finished input offsets per partition; see the module docstring.

    Attributes:
        transactions: transactions that committed input positions (on all partitions).
    """

    def __init__(self) -> None:
        self._open: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}  # what ``take`` last returned and was committed
        self._last: dict[TopicPartition, int] = {}  # committed as known: found on assignment, or committed
        self._settled: dict[int, list[Pending]] = {}  # partition -> answered inputs, waiting for a whole take
        self._strict: dict[TopicPartition, set[int]] = {}  # finished, must commit with their answer
        self._generation: dict[TopicPartition, int] = {}  # tp -> times forgotten (kept: a few per input)
        self.transactions = 0

    def consumed(self, tp: TopicPartition, offset: int) -> Pending:
        """An input record was read from ``tp``: open until its answer is taken into a transaction."""
        self._open.setdefault(tp, deque()).append(offset)
        self._done.setdefault(tp, set())
        self._next[tp] = offset + 1
        return Pending(tp, offset, self._generation.get(tp, 0))

    def consumed_to(self, tp: TopicPartition) -> int | None:
        """The offset after the last record consumed from ``tp``, or None if none since it was assigned."""
        return self._next.get(tp)

    def settled(self, inputs: Iterable[Pending]) -> None:
        """Finish ``inputs`` that need no output of their own: a decision already queued on their partition's
        writer answers them (the echo of an eager task whose result is decided; an attempt not started
        because a copy of it was decided). They finish with the next transaction that takes all its writer
        holds, so never before that decision, and are lazy: re-read, they are as stale as now."""
        for inp in inputs:
            self._settled.setdefault(inp.tp.partition, []).append(inp)

    def take(
        self,
        partition: int,
        answered: Iterable[Pending],
        *,
        whole: bool,
        lazy: Iterable[Pending] = (),
    ) -> Taken:
        """``partition``'s writer took a batch into a transaction: finish the inputs its decisions answer
        (``answered``: strict, ``lazy``: may commit later; the settled ones too, lazy, if ``whole``: the
        batch is all the writer held); return the positions to commit with it that moved since the last
        commit, and whether they may wait (see the module docstring)."""
        for inp in answered:
            self._finish(inp, strict=True)
        for inp in lazy:
            self._finish(inp, strict=False)
        if whole:
            for inp in self._settled.pop(partition, ()):
                self._finish(inp, strict=False)
        out = {}
        may_wait = True
        for tp, q in self._open.items():
            if tp.partition != partition:
                continue
            done = self._done[tp]
            while q and q[0] in done:
                done.discard(q.popleft())
            pos = q[0] if q else self._next[tp]
            if self._committed.get(tp) != pos:
                out[tp] = pos
                strict = self._strict.get(tp)
                if strict and min(strict) < pos:
                    may_wait = False
        return Taken(out, may_wait)

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        """The positions ``take`` returned are committed (their transaction is)."""
        self._committed.update(positions)
        self._last.update(positions)
        for tp, pos in positions.items():
            strict = self._strict.get(tp)
            if strict:
                strict.difference_update([off for off in strict if off < pos])
        self.transactions += 1

    def positioned(self, positions: dict[TopicPartition, int]) -> None:
        """The committed positions found when a partition was assigned (its inputs are read from there)."""
        self._last.update(positions)

    def last(self, partition: int) -> dict[TopicPartition, int]:
        """The last committed positions of ``partition``'s inputs: what a probe transaction commits again."""
        return {tp: off for tp, off in self._last.items() if tp.partition == partition}

    def forget(self, partitions: set[int]) -> None:
        """Drop the partitions a rebalance took away (their open inputs are read again by the next owner)."""
        for tp in [tp for tp in {*self._open, *self._last} if tp.partition in partitions]:
            for d in (self._open, self._done, self._next, self._committed, self._last, self._strict):
                d.pop(tp, None)
            self._generation[tp] = self._generation.get(tp, 0) + 1
        for p in partitions:
            self._settled.pop(p, None)

    def _finish(self, inp: Pending, *, strict: bool) -> None:
        done = self._done.get(inp.tp)
        if done is not None and inp.generation == self._generation.get(inp.tp, 0):
            done.add(inp.offset)
            if strict:
                self._strict.setdefault(inp.tp, set()).add(inp.offset)

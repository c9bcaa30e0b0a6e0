"""Ordered, pipelined output of decisions: records first, the run's state after they are acked.

Each decision's events, tasks and dead-letter records are sent in decision order; its state record is sent
only once those are acknowledged, again in decision order, so the compacted state topic never holds a
state whose consequences were lost. The input record counts as finished (its offset may be committed)
only when the state is acknowledged too. A crash in between re-delivers the input; the decider, being
deterministic, re-makes the same decision, and the duplicates it re-sends are recognised downstream
(same run, step and attempt; same event seq).

States are encoded only when sent, and a state is not sent at all when a later decision of the same run
is already queued: the later state includes it (compaction would keep only that one anyway). The
superseded decision's input finishes when the later state is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer


@dataclass(frozen=True)
class Out:
    """One record to send to an explicit partition."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class LazyOut:
    """A record whose value is encoded only if it is sent (a run's state)."""

    topic: str
    partition: int
    key: bytes
    encode: Callable[[], bytes]


# a run's state may absorb this many superseded ones, so a run deciding without pause still gets written
_MAX_ABSORBED = 64


@dataclass
class _Item:
    outputs: list[Out]
    state: LazyOut | None
    on_done: Callable[[], None] | None
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    absorbed: list[_Item] = field(default_factory=list)  # superseded decisions finishing with this one


class Publisher:
    """Sends decisions through one producer in two ordered stages; see the module docstring."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        on_error: Callable[[BaseException], None],
        max_pending: int = 2_000,
    ) -> None:
        self._producer = producer
        self._on_error = on_error
        self._max_pending = max_pending
        self._room = asyncio.Event()  # set while fewer than max_pending decisions are unacknowledged
        self._room.set()
        self._stage1: asyncio.Queue[_Item] = asyncio.Queue()
        self._stage2: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending = 0
        self._latest: dict[tuple[str, int, bytes], _Item] = {}  # newest queued decision per state key
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_outputs()), asyncio.create_task(self._send_states())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, outputs: list[Out], state: LazyOut | None, on_done: Callable[[], None] | None) -> None:
        """Queue one decision's records; synchronous, so decisions keep the order they were made in."""
        self._pending += 1
        self._idle.clear()
        if self._pending >= self._max_pending:
            self._room.clear()
        item = _Item(outputs, state, on_done)
        if state is not None:
            self._latest[(state.topic, state.partition, state.key)] = item
        self._stage1.put_nowait(item)

    async def room(self) -> None:
        """Wait until fewer than ``max_pending`` decisions are unacknowledged (the worker's backpressure)."""
        await self._room.wait()

    async def drain(self) -> None:
        """Wait until everything submitted so far is acknowledged."""
        await self._idle.wait()

    async def _send(self, out: Out) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = await self._producer.send(
            out.topic, out.value, key=out.key, partition=out.partition, headers=list(out.headers)
        )
        return fut

    async def _send_outputs(self) -> None:
        try:
            while True:
                item = await self._stage1.get()
                item.futures = [await self._send(o) for o in item.outputs]
                self._stage2.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a produce that failed after its retries: the worker must stop
            self._on_error(exc)

    async def _send_states(self) -> None:
        try:
            while True:
                item = await self._stage2.get()
                if item.futures:
                    await asyncio.gather(*item.futures)
                st = item.state
                if st is None:
                    self._finish(item, None)
                    continue
                k = (st.topic, st.partition, st.key)
                later = self._latest.get(k, item)
                if later is item:
                    del self._latest[k]
                elif len(later.absorbed) < _MAX_ABSORBED:
                    later.absorbed += [item, *item.absorbed]  # its state follows, with this one in it
                    item.absorbed = []
                    continue
                else:  # enough waiting: this state is sent and covers the decisions absorbed so far
                    item.absorbed += later.absorbed
                    later.absorbed = []
                fut = await self._send(Out(st.topic, st.partition, st.key, st.encode()))
                fut.add_done_callback(functools.partial(self._finish, item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._on_error(exc)

    def _finish(self, item: _Item, fut: asyncio.Future[Any] | None) -> None:
        if fut is not None and not fut.cancelled() and fut.exception() is not None:
            self._on_error(fut.exception())  # type: ignore[arg-type]
            return
        for done in (*item.absorbed, item):
            if done.on_done is not None:
                done.on_done()
            self._pending -= 1
        if self._pending < self._max_pending:
            self._room.set()
        if self._pending == 0:
            self._idle.set()

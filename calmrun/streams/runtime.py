"""The lifecycle shared by the deciding worker and the pool executor: start, guarded loops, stop, fail once.

A ``Runtime`` runs its loops as guarded tasks: anything a loop raises (or a room reports to ``fail``, its
``Failures`` port) is the first failure, kept as ``failure``; it cancels the loops and wakes
``run_until_stopped``, which raises ``WorkerError`` from it. ``stop()`` runs once whatever calls it (the
caller, a signal, ``async with``): it cancels the loops and then the role's ``_close`` releases what it
holds in its own order. Nothing here touches offsets or transactions: what a stop commits, and what is read
again after it, is the role's (``streams.worker``, ``streams.pool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, Self

from calmrun.errors import WorkerError
from calmrun.gctune import settle_heap

Loop = Coroutine[Any, Any, None]
"""One of a runtime's loops: runs until cancelled or until it raises (which stops the runtime)."""


def wall_ms() -> int:
    """The default clock of a worker and an executor: wall-clock milliseconds."""
    return time.time_ns() // 1_000_000


class Runtime(ABC):
    """Starts, runs and stops one process's main object; the role says what it opens and how it closes.

    Args:
        role: the role's name in logs and in ``WorkerError`` (``"worker"``, ``"executor"``).
        log: the role's logger.
        gc_threshold: ``run()`` settles the heap with it once started (``calmrun.gctune``; 0: left as is).
    """

    def __init__(self, role: str, log: logging.Logger, gc_threshold: int = 0) -> None:
        self._role, self._log, self._gc_threshold = role, log, gc_threshold
        self._loops: list[asyncio.Task[None]] = []
        self._bodies: list[Loop] = []  # the loops' coroutines: closed on stop, started or not
        self._failed: BaseException | None = None
        self._stopped = asyncio.Event()  # set by stop() or by a failure: run_until_stopped() returns
        self.closing = False  # stop() has run (or is running)

    @property
    def failure(self) -> BaseException | None:
        """Why it stopped on its own, if it did."""
        return self._failed

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the clients, join the group and start the loops (the role's ``_open``).

        Raises:
            BrokerUnavailableError: the broker does not answer.
            KafkaAuthError: TLS, SASL or the protocol does not match the broker's.
            KafkaAuthorizationError: an ACL refuses a topic, the group or the transactional IDs.
        """
        loops = await self._open()
        self._bodies = [loop for _, loop in loops]
        self._loops = [asyncio.create_task(self._guarded(loop), name=name) for name, loop in loops]

    async def stop(self) -> None:
        """Stop the loops, then release in the role's order (``_close``); a second call returns at once."""
        if self.closing:
            return
        self.closing = True
        self._stopped.set()
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for body in self._bodies:
            body.close()  # a loop cancelled before it began was never awaited: no warning, nothing left
        await self._close()

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """A process's main job: start, settle the heap, run until SIGINT/SIGTERM or a failure, stop.

        Raises:
            WorkerError: as ``run_until_stopped``.
        """
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[None]] = []
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._stop_soon, stopping)
        try:
            await self.start()
            settle_heap(self._gc_threshold)
            if on_started is not None:
                on_started()
            await self.run_until_stopped()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            for t in stopping:
                await t
            await self.stop()

    async def run_until_stopped(self) -> None:
        """Block until ``stop()`` is called or it fails.

        Raises:
            WorkerError: a transaction failed for a reason other than fencing, or a storm of records
                failed unexpectedly; nothing after the last commit is lost, it is read again.
        """
        await self._stopped.wait()
        if self._failed is not None:
            raise WorkerError(f"{self._role} stopped: {self._failed!r}") from self._failed

    @abstractmethod
    async def _open(self) -> list[tuple[str, Loop]]:
        """Open the clients and take what the group assigns; return the loops to run, by task name."""

    @abstractmethod
    async def _close(self) -> None:
        """Release what ``_open`` took, once its loops have ended (called once)."""

    def _stop_soon(self, stopping: list[asyncio.Task[None]]) -> None:
        stopping.append(asyncio.create_task(self.stop()))

    def fail(self, exc: BaseException) -> None:
        """The first failure is kept; every one stops the loops and wakes ``run_until_stopped``."""
        self._log.error("%s failing: %r", self._role, exc)
        if self._failed is None:
            self._failed = exc
        self._stopped.set()
        for t in self._loops:
            t.cancel()

    async def _guarded(self, loop: Loop) -> None:
        """Run one loop; anything it raises stops the runtime."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.fail(exc)

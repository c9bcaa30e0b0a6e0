"""The lifecycle the worker and the pool executor share (``streams.runtime``), on its own (pure asyncio)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from calmrun.errors import WorkerError
from calmrun.streams.runtime import Loop, Runtime


class Role(Runtime):
    """A role with one loop that waits forever and one that raises when told to; records its closes."""

    def __init__(self) -> None:
        super().__init__("tester", logging.getLogger("tests.runtime"))
        self.boom = asyncio.Event()
        self.closed = 0

    async def _open(self) -> list[tuple[str, Loop]]:
        return [("wait", self._wait()), ("boom", self._boom())]

    async def _wait(self) -> None:
        await asyncio.Event().wait()

    async def _boom(self) -> None:
        await self.boom.wait()
        raise RuntimeError("the loop broke")

    async def _close(self) -> None:
        self.closed += 1


async def test_a_loop_that_raises_stops_the_runtime_with_that_cause() -> None:
    role = Role()
    async with role:
        role.boom.set()
        with pytest.raises(WorkerError, match="tester stopped") as raised:
            await role.run_until_stopped()
        assert isinstance(raised.value.__cause__, RuntimeError)
        assert role.failure is raised.value.__cause__
    assert role.closed == 1 and role.closing


async def test_stop_closes_once_however_often_it_is_called() -> None:
    role = Role()
    await role.start()
    await asyncio.gather(role.stop(), role.stop())
    await role.stop()
    assert role.closed == 1 and role.failure is None
    await role.run_until_stopped()  # stopped without a failure: returns


async def test_the_first_failure_is_kept() -> None:
    role = Role()
    await role.start()
    await asyncio.sleep(0)  # the loops enter their bodies
    first, second = ValueError("first"), ValueError("second")
    role.fail(first)
    role.fail(second)
    await role.stop()
    assert role.failure is first

"""``agents.executor.under``: an agent awaited under its deadline, the timer made and armed only once it
suspends."""

from __future__ import annotations

import asyncio

import pytest

from calmrun.agents.executor import Deadline, under


async def test_an_agent_that_never_suspends_returns_its_value() -> None:
    async def plain() -> int:
        return 7

    deadline = Deadline(30)
    assert await under(deadline, plain()) == 7
    assert not deadline.expired() and deadline.timeout is None  # no timer was made, nor armed


async def test_an_agent_that_suspends_returns_what_it_awaited() -> None:
    async def slow(n: int) -> int:
        await asyncio.sleep(0)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, n)
        return await fut + 1

    deadline = Deadline(30)
    assert await under(deadline, slow(1)) == 2
    assert deadline.timeout is not None and not deadline.expired()  # armed once it suspended


async def test_an_agent_over_its_deadline_is_cancelled_and_the_deadline_says_so() -> None:
    seen: list[str] = []

    async def hangs() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return 0

    deadline = Deadline(0.05)
    with pytest.raises(TimeoutError):
        await under(deadline, hangs())
    assert deadline.expired() and seen == ["cancelled"]


async def test_errors_before_and_after_the_first_suspension_propagate() -> None:
    async def at_once() -> int:
        raise ValueError("before")

    async def later() -> int:
        await asyncio.sleep(0)
        raise KeyError("after")

    with pytest.raises(ValueError, match="before"):
        await under(Deadline(30), at_once())
    with pytest.raises(KeyError, match="after"):
        await under(Deadline(30), later())


async def test_cancelling_the_caller_cancels_the_agent_which_may_answer_it() -> None:
    started = asyncio.Event()

    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "stopped"
        return "slept"

    async def hard() -> str:
        started.set()
        await asyncio.sleep(30)
        return "slept"

    task = asyncio.create_task(under(Deadline(30), stubborn()))
    await started.wait()
    task.cancel()
    assert await task == "stopped"  # as a plain await of it would return

    started.clear()
    task = asyncio.create_task(under(Deadline(30), hard()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

"""The task runner on its own (pure asyncio): an attempt cancelled before it ever ran can start again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.records import Out
from calmrun.streams.tasks import TaskRunner
from calmrun.workflow.events import StepResult, StepTask
from tests.runtime_support import until


def _task(run_id: str = "r1") -> StepTask:
    return StepTask(
        run_id=run_id, workflow="w", version="1", step="s", attempt=1, agent="x", issued_ms=0, timeout_s=30
    )


class Ports:
    """The runner's ports (``streams.ports``) in one object: runs ``execute``, admits all, keeps results."""

    def __init__(self, execute: Callable[[StepTask], Awaitable[StepResult]]) -> None:
        self._execute = execute
        self.results: list[str] = []

    async def execute(self, task: StepTask) -> StepResult:
        return await self._execute(task)

    async def admit(self, p: int, task: StepTask) -> bool:
        return True

    async def accept(self, p: int) -> bool:
        return True

    def result(self, p: int, task: StepTask, result: StepResult, source: Any, pending: Sequence[Any]) -> None:
        self.results.append(task.idempotency_key)

    def fail(self, exc: BaseException) -> None:
        raise AssertionError(f"runner failed: {exc!r}")


def _out() -> Out:
    return Out("w.steps.s", 0, b"r1", b"")


async def test_an_attempt_cancelled_before_its_first_step_is_started_again_by_the_next_resume() -> None:
    """A resumed attempt has no task record: after ``cancel`` (a rebalance, a fenced partition) only the next
    ``resume`` starts it again. A cancel in the same loop iteration as the start never lets the task enter
    its body; the runner must not keep the attempt as running here, or no later resume starts it."""
    ran: list[str] = []

    async def execute(task: StepTask) -> StepResult:
        ran.append(task.idempotency_key)
        return StepResult(run_id=task.run_id, step=task.step, attempt=task.attempt, at_ms=0, output={})

    ports = Ports(execute)
    results = ports.results
    runner = TaskRunner(4, ports, ports, ports, Checkpoint(), ports)
    task = _task()
    assert runner.resume(0, [(_out(), task)]) == 1
    await runner.cancel({0})  # same iteration: the attempt's task never took its first step
    await asyncio.sleep(0)  # the loop runs what the cancel scheduled
    assert ran == [] and task.idempotency_key not in runner and len(runner) == 0

    assert runner.resume(0, [(_out(), task)]) == 1  # the partition is taken over again: it starts
    await until(lambda: results == [task.idempotency_key], 10, "the resumed attempt's result")
    assert ran == [task.idempotency_key]
    await asyncio.wait_for(runner.room(), 10)


class _WindingDown:
    """An agent whose first run, once cancelled, ends only when ``release`` is set: as pydantic-ai's
    synchronous tools do (anyio's ``run_sync`` delivers the cancellation once the tool's thread returns)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.ran: list[str] = []
        self.results: list[str] = []

    async def execute(self, task: StepTask) -> StepResult:
        self.ran.append(task.idempotency_key)
        if len(self.ran) == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await self.release.wait()
                raise
        return StepResult(run_id=task.run_id, step=task.step, attempt=task.attempt, at_ms=0, output={})

    def runner(self) -> TaskRunner:
        ports = Ports(self.execute)
        self.results = ports.results
        return TaskRunner(4, ports, ports, ports, Checkpoint(), ports)


async def test_a_resume_while_the_cancelled_run_of_its_attempt_winds_down_starts_it_once_that_ended() -> None:
    """A retake (``cancel_now``, then the partition taken over again and its attempts resumed) can resume an
    attempt whose cancelled run has not ended yet. With no task record nothing else would start it before its
    deadline: the resume starts it once the old run has ended, never beside it."""
    agent = _WindingDown()
    runner = agent.runner()
    task = _task()
    assert runner.resume(0, [(_out(), task)]) == 1
    await until(lambda: agent.ran == [task.idempotency_key], 10, "the first run")
    runner.cancel_now(0)  # a fence or a broken producer: asked to stop, not awaited
    await asyncio.sleep(0.05)
    assert task.idempotency_key in runner  # still winding down: it holds the attempt's key

    assert runner.resume(0, [(_out(), task)]) == 1  # the retake's resume
    await asyncio.sleep(0.05)
    assert agent.ran == [task.idempotency_key]  # not beside the old run
    agent.release.set()
    await until(lambda: agent.results == [task.idempotency_key], 10, "the resumed attempt's result")
    assert agent.ran == [task.idempotency_key] * 2
    await asyncio.wait_for(runner.room(), 10)


async def test_a_cancel_drops_the_start_that_waited_for_an_earlier_cancelled_run() -> None:
    """``cancel`` (a stop, a partition restored anew) stops an attempt's run and a start waiting for it."""
    agent = _WindingDown()
    runner = agent.runner()
    task = _task()
    runner.resume(0, [(_out(), task)])
    await until(lambda: agent.ran == [task.idempotency_key], 10, "the first run")
    runner.cancel_now(0)
    runner.resume(0, [(_out(), task)])  # waits for the first run's end
    agent.release.set()
    await asyncio.wait_for(runner.cancel({0}), 10)  # the worker stops
    await asyncio.sleep(0.05)
    assert agent.ran == [task.idempotency_key] and agent.results == [] and len(runner) == 0

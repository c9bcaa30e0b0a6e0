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

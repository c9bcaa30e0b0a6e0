"""The shell's one port to tracing; this class is tracing switched off, every hook doing nothing.

The shell calls these hooks in a few places (one line each): the decisions (``decision``, ``task_headers``),
the attempts (``attempt``), the pool executor (``result_headers``, ``result_committed``), the worker and the
executor (``models``, ``close``). ``calmrun.tracing.otel.OtelTracing`` implements them with OpenTelemetry;
with ``tracing.endpoint`` unset they cost a method call and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from calmrun.agents import ModelRegistry
    from calmrun.workflow.decider import Decision
    from calmrun.workflow.definition import WorkflowDef
    from calmrun.workflow.events import DeciderInput, StepResult, StepTask
    from calmrun.workflow.state import RunState

Headers = tuple[tuple[str, bytes], ...]


class Tracing:
    """Tracing off. Subclasses emit spans; see ``docs/traces.md`` for the shape of a run's trace."""

    enabled = False

    def models(self, models: ModelRegistry) -> ModelRegistry:
        """The registry the attempts resolve models from (instrumented, so model requests make spans)."""
        return models

    def task_headers(self, task: StepTask) -> Headers:
        """Headers for a task record: the ``traceparent`` an executor's attempt span is a child of."""
        return ()

    async def attempt(self, task: StepTask, run: Callable[[], Awaitable[StepResult]]) -> StepResult:
        """Run one attempt (``run``) inside its attempt span; the span ends when its result is committed."""
        return await run()

    def result_headers(self, task: StepTask) -> Headers:
        """Headers for a pool executor's result record: the ``traceparent`` of the attempt span."""
        return ()

    def result_committed(self, task: StepTask) -> None:
        """A pool executor's result of ``task`` is committed: its attempt span ends."""

    def decision(
        self,
        wf: WorkflowDef,
        before: RunState | None,
        inp: DeciderInput,
        decision: Decision,
        headers: Sequence[tuple[str, bytes]],
    ) -> Callable[[], None] | None:
        """A decision was made; the callable returned (if any) is called once it is committed.

        Args:
            wf: the run's definition.
            before: the run's state before the input (None for a new run).
            inp: the input decided.
            decision: what the decider returned.
            headers: the input record's headers (a ``traceparent`` there becomes a span link).
        """
        return None

    def close(self) -> None:
        """Export what is left and stop (the worker's or executor's ``stop``)."""


NO_TRACING = Tracing()
"""The tracing of a process whose settings set no ``tracing.endpoint``."""

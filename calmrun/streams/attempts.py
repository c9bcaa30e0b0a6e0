"""One attempt where it executes (a deciding worker or a pool executor): the agent under its limits.

Both run a task the same way: ``agents.execute`` with the process's pricing and ``settings.limits``,
behind ``streams.throttle`` (the limits per model alias and step; a 429 pauses the alias here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from calmrun.agents import AgentRegistry, ModelRegistry, execute
from calmrun.costs.pricing import Pricing
from calmrun.settings import Settings
from calmrun.streams.journal import KafkaJournal
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.requestmetrics import RequestMetrics
from calmrun.streams.throttle import Throttle
from calmrun.tracing import NO_TRACING, Tracing
from calmrun.workflow.events import StepResult, StepTask
from calmrun.workflow.state import RunState


class Attempts:
    """Runs attempts with one process's agents, models, pricing and throttle, each in its attempt span."""

    def __init__(
        self,
        settings: Settings,
        agents: AgentRegistry,
        models: ModelRegistry,
        throttle: Throttle,
        clock: Callable[[], int],
        tracing: Tracing = NO_TRACING,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings, self.agents, self.models, self.throttle, self.clock = (
            settings,
            agents,
            models,
            throttle,
            clock,
        )
        self.pricing = Pricing.from_settings(settings)
        self.tracing = tracing
        self.models = tracing.models(models)  # instrumented when tracing: model requests nest in attempts
        self.journal: KafkaJournal | None = KafkaJournal(settings)
        self._first: set[str] = set()  # idempotency keys of first runs (see first_runs)
        # cost per request in the worker's registry (an executor of a pool has none)
        self.metrics = RequestMetrics(metrics.registry, self.pricing) if metrics is not None else None

    def first_runs(self, started: Iterable[tuple[StepTask, RunState | None]]) -> None:
        """Note the tasks a worker starts eagerly, right after committing the decision that scheduled them.

        The first issue of an attempt (``issued_ms`` is the step's ``scheduled_ms``; a deadline re-issue is
        later; a task carrying answers to tool calls ran before it paused) started that way has never run
        anywhere: its agent journal is known to be empty and is not read. Any other start (a task read back
        after a crash or a rebalance, a re-issue) reads it.
        """
        for task, state in started:
            st = state.steps.get(task.step) if state is not None else None
            if st is not None and st.scheduled_ms == task.issued_ms and task.approvals is None:
                self._first.add(task.idempotency_key)
        if len(self._first) > 100_000:  # tasks noted but never run (their partition moved): forget them
            self._first.clear()

    @property
    def noted_first(self) -> int:
        """First runs noted and not yet run here (0 once a quiet worker's attempts have all run)."""
        return len(self._first)

    async def run(self, task: StepTask, scrub: Callable[[str], str]) -> StepResult:
        """Run ``task``'s agent once; ``scrub`` redacts its failure's log line."""
        run = functools.partial(
            execute,
            task,
            self.agents,
            self.models,
            now_ms=self.clock,
            pricing=self.pricing,
            scrub=scrub,
            limits=self.settings.limits,
            on_failure=functools.partial(self.throttle.failed, task),
            journal=self.journal,
            fresh=self._pop_first(task.idempotency_key),
            on_journal=self.metrics.observe if self.metrics is not None else None,
        )
        result = await self.tracing.attempt(task, run)
        self.throttle.finished(task, result)
        return result

    def _pop_first(self, key: str) -> bool:
        if key in self._first:
            self._first.discard(key)
            return True
        return False

    async def close(self) -> None:
        """Close the journal's clients."""
        if self.journal is not None:
            await self.journal.close()

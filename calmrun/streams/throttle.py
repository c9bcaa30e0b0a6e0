"""Limits per model alias and per step in one worker (``settings.throttle``), applied before an agent starts.

A task takes, in this order, a permit of its step (``steps['<workflow>/<step>'].max_concurrency``), a permit
of its model alias (``models[alias].max_concurrency``), then waits until its alias is not paused and its
rates allow a start; the permits are held until the attempt finishes. Rates are generic cell rate
algorithms (a virtual scheduling time per limit, no timers):

- ``requests_per_minute``: starts are spaced ``60 / rpm`` seconds apart (``requests_burst`` at once); an
  attempt that made more than one model request pays for the others when it finishes.
- ``tokens_per_minute``: a finished attempt's tokens (in + out, from its recorded cost) are debited when
  it finishes; no attempt of the alias starts while more than a minute's worth is outstanding.
- a rate limit from the provider (HTTP 429, see ``calmrun.agents.providers.rate_limited``) pauses the alias
  for every step on this worker, for its ``Retry-After`` (else ``retry_after_default_s``, at most
  ``max_pause_s``), not only for the attempt that saw it.

Waiting happens before the task takes a ``max_in_flight`` slot (``TaskRunner``), and an alias waits only
for its own limits: other aliases and steps start meanwhile. The wait is part of the attempt's queue wait
(``StepCost.queue_wait_ms``, measured from the task's issue to its agent's start). A task waiting past its
durable deadline is not issued again by this worker (``Timers`` skips attempts running or waiting here); a
new owner of the partition issues it again under the same idempotency key, and this worker's copy is
cancelled with the partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from calmrun.agents.providers import rate_limited, retry_after_ms
from calmrun.errors import ConfigError
from calmrun.settings import AliasThrottle, ThrottleSettings
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import StepResult, StepTask


@dataclass
class _Alias:
    limits: AliasThrottle
    permits: asyncio.Semaphore | None = None
    requests_at: float = 0.0  # the virtual time of the next start (GCRA)
    tokens_at: float = 0.0  # the virtual time when the tokens debited so far are paid back
    paused_until: float = 0.0

    def __post_init__(self) -> None:
        if self.limits.max_concurrency is not None:
            self.permits = asyncio.Semaphore(self.limits.max_concurrency)

    def wait_s(self, now: float) -> float:
        """How long until a start is allowed (0: now)."""
        wait = self.paused_until - now
        rpm = self.limits.requests_per_minute
        if rpm is not None:
            wait = max(wait, self.requests_at - (self.limits.requests_burst - 1) * 60 / rpm - now)
        if self.limits.tokens_per_minute is not None:
            wait = max(wait, self.tokens_at - 60.0 - now)
        return max(0.0, wait)

    def take(self, now: float, requests: int = 1) -> None:
        rpm = self.limits.requests_per_minute
        if rpm is not None and requests > 0:
            self.requests_at = max(self.requests_at, now) + requests * 60 / rpm

    def debit(self, now: float, tokens: int) -> None:
        tpm = self.limits.tokens_per_minute
        if tpm is not None and tokens > 0:
            self.tokens_at = max(self.tokens_at, now) + tokens * 60 / tpm


@dataclass
class ThrottleCounts:
    """What the throttle did, for metrics: waits and waited seconds per limit, pauses per alias."""

    waits: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, name) -> waits
    waited_s: dict[tuple[str, str], float] = field(default_factory=dict)
    pauses: dict[str, int] = field(default_factory=dict)


class Throttle:
    """The limits of ``settings.throttle`` for the workflows of one worker; see the module docstring.

    Args:
        settings: the limits.
        workflows: the workflows this worker runs (step keys must name one of their steps).
        aliases: the model aliases known to the worker (limited aliases must be among them).
        clock: monotonic seconds.

    Raises:
        ConfigError: a limit names a step or alias this worker does not know (a typo would limit nothing).
    """

    def __init__(
        self,
        settings: ThrottleSettings,
        workflows: Collection[WorkflowDef],
        aliases: Collection[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        steps = {f"{wf.name}/{s.name}" for wf in workflows for s in wf.steps}
        for key in settings.steps:
            if key not in steps:
                raise ConfigError(
                    f"throttle.steps names {key!r}, not a step of this worker; known {sorted(steps)}"
                )
        for alias in settings.models:
            if alias not in aliases:
                raise ConfigError(
                    f"throttle.models names {alias!r}, not a model alias; configured {sorted(aliases)}"
                )
        self.settings = settings
        self._clock = clock
        self._steps = {k: asyncio.Semaphore(v.max_concurrency) for k, v in settings.steps.items()}
        self._aliases = {a: _Alias(lim) for a, lim in settings.models.items()}
        self.counts = ThrottleCounts()
        self.started: Callable[[StepTask, float], None] | None = None
        """Called with each limited task and the clock's time when its limits let it start (tests, traces)."""

    def paused(self) -> dict[str, float]:
        """Aliases paused now after a rate limit, with the seconds left."""
        now = self._clock()
        return {a: st.paused_until - now for a, st in self._aliases.items() if st.paused_until > now}

    def hold(self, task: StepTask) -> AbstractAsyncContextManager[None] | None:
        """Wait until ``task`` may start under its step's and its alias's limits; hold them until exit.

        Returns None when no limit applies to ``task`` (nothing to wait for).
        """
        step = self._steps.get(f"{task.workflow}/{task.step}") if self._steps else None
        alias = self._aliases.get(task.model) if task.model is not None else None
        if step is None and alias is None:
            return None
        return self._held(task, step, alias)

    @contextlib.asynccontextmanager
    async def _held(
        self, task: StepTask, step: asyncio.Semaphore | None, alias: _Alias | None
    ) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as held:
            if step is not None:
                await self._take(held, step, ("step", f"{task.workflow}/{task.step}"))
            if alias is not None:
                if alias.permits is not None:
                    await self._take(held, alias.permits, ("model", task.model or ""))
                await self._pace(alias, task.model or "")
            if self.started is not None:
                self.started(task, self._clock())
            yield

    async def _take(
        self, held: contextlib.AsyncExitStack, permits: asyncio.Semaphore, key: tuple[str, str]
    ) -> None:
        if permits.locked():
            t0 = self._clock()
            await permits.acquire()
            self._count(key, self._clock() - t0)
        else:
            await permits.acquire()
        held.callback(permits.release)

    async def _pace(self, alias: _Alias, name: str) -> None:
        t0 = self._clock()
        waited = False
        while (wait := alias.wait_s(self._clock())) > 0:
            waited = True
            await asyncio.sleep(wait)
        alias.take(self._clock())
        if waited:
            self._count(("rate" if alias.paused_until <= t0 else "paused", name), self._clock() - t0)

    def _count(self, key: tuple[str, str], waited: float) -> None:
        c = self.counts
        c.waits[key] = c.waits.get(key, 0) + 1
        c.waited_s[key] = c.waited_s.get(key, 0.0) + waited

    def finished(self, task: StepTask, result: StepResult) -> None:
        """Debit the attempt's recorded usage: its tokens, and its model requests past the first."""
        alias = self._aliases.get(task.model) if task.model is not None else None
        if alias is None:
            return
        now = self._clock()
        alias.debit(now, result.cost.tokens_in + result.cost.tokens_out)
        alias.take(now, result.cost.requests - 1)

    def failed(self, task: StepTask, exc: BaseException) -> None:
        """An agent raised ``exc``: a provider's rate limit pauses the task's alias on this worker."""
        if task.model is None or not rate_limited(exc):
            return
        asked = retry_after_ms(exc)
        pause = self.settings.retry_after_default_s if asked is None else asked / 1000
        pause = min(pause, self.settings.max_pause_s)
        alias = self._aliases.get(task.model)
        if alias is None:
            alias = self._aliases[task.model] = _Alias(AliasThrottle())
        alias.paused_until = max(alias.paused_until, self._clock() + pause)
        self.counts.pauses[task.model] = self.counts.pauses.get(task.model, 0) + 1

"""Run one step attempt: resolve its agent, run it under the step's timeout, report a StepResult.

Every outcome of the agent becomes a result (an output, or an error with whether a retry may help) with the
attempt's cost, failed attempts included; only cancellation of the caller propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from calmrun.agents.context import StepContext
from calmrun.agents.journal import AttemptJournal, JournalStore, since_ms
from calmrun.agents.models import ModelRegistry, retry_after_ms
from calmrun.agents.specs import AgentRegistry
from calmrun.costs.pricing import Pricing
from calmrun.errors import CalmrunError, ErrorKind, ToolApprovalPendingError
from calmrun.limits import check_output
from calmrun.settings import LimitsSettings
from calmrun.workflow.events import StepResult, StepTask

AGENT_TIMEOUT = ErrorKind.AGENT_TIMEOUT
"""``error_type`` of an attempt that did not finish within the step's ``timeout_s`` (retriable)."""

DEFAULT_LIMITS = LimitsSettings()
MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000
T = TypeVar("T")


async def execute(
    task: StepTask,
    registry: AgentRegistry,
    models: ModelRegistry,
    *,
    now_ms: Callable[[], int],
    logger: logging.Logger | None = None,
    pricing: Pricing | None = None,
    scrub: Callable[[str], str] | None = None,
    limits: LimitsSettings | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    journal: JournalStore | None = None,
    fresh: bool = False,
    on_journal: Callable[[StepContext], None] | None = None,
) -> StepResult:
    """Run ``task``'s agent once and describe what happened.

    The agent runs under ``asyncio.timeout(task.timeout_s)``; on expiry it is cancelled and the result is an
    ``AgentTimeout`` error (retriable). Errors of calmrun's hierarchy keep their ``retriable`` flag; any other
    exception an agent raises is retriable (the retry policy bounds it, then the run is quarantined).

    Args:
        task: the attempt to run.
        registry: where ``task.agent`` is resolved.
        models: where the step's model alias (``task.model``) is resolved.
        now_ms: wall clock in epoch milliseconds (queue wait is measured against ``task.issued_ms``).
        logger: base logger of the step context (default ``calmrun.agents``).
        pricing: turns the attempt's tokens and API calls into money (``cost_usd``, ``price_source``);
            without it the cost carries no money.
        scrub: applied to the failure's log line (``settings.redact``: the run's redacted values).
        limits: an output over ``max_output_bytes`` (or too deep, or with too long a number) fails the
            attempt as an ``InvalidOutputError``; default ``LimitsSettings()``.
        on_failure: told the exception an agent raised (a provider's 429 pauses its alias:
            ``streams.throttle``); not told of timeouts.
        journal: where the attempt's agent journal lives (``agents.journal``); with it every pydantic-ai
            agent run through the context is durable: a re-run of the same attempt answers its recorded
            model requests and tool calls from the journal. None: agents run as they are.
        fresh: the attempt has never run anywhere (the worker started it eagerly on its first issue): its
            journal is empty and is not read.
        on_journal: told the context once the attempt ended, when its agents wrote or read a journal (the
            per-request cost and the journal's figures are on ``ctx.journal``).

    Returns:
        The attempt's result, with its cost (tokens used by a failed attempt are reported too).

    Raises:
        asyncio.CancelledError: the caller was cancelled (worker shutdown); no result is produced.
    """
    started_ms = now_ms()
    t0 = time.monotonic()
    ctx = StepContext.for_task(task, models, logger)
    if journal is not None:
        ctx.journal = AttemptJournal(
            journal,
            run_id=task.run_id,
            step=task.step,
            attempt=task.attempt,
            attempt_key=ctx.idempotency_key,  # the task's, computed once
            since_ms=since_ms(min(task.issued_ms, task.first_issued_ms or task.issued_ms), task.timeout_s),
            source=task,
            recorded=[] if fresh else None,
        )
    output: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None
    retriable = True
    tb: str | None = None
    retry_after: int | None = None
    deadline = Deadline(task.timeout_s)
    try:
        spec = registry.resolve(task.agent)
        produced = await under(deadline, spec.call(ctx, task.input))
        check_output(produced, limits or DEFAULT_LIMITS, task.agent)
        output = produced
    # Broad on purpose: the failure is not swallowed, it becomes the attempt's recorded result, which the
    # decider retries or quarantines. CancelledError is a BaseException and propagates.
    except Exception as exc:
        if isinstance(exc, ToolApprovalPendingError):
            # not a failure: the attempt pauses; the decider sets the step waiting for a person's answer
            error_type, error, retriable = ErrorKind.TOOL_APPROVAL_PENDING.value, str(exc), False
            output = {"tool_approval": exc.pending}
            ctx.logger.info("%s", error)
        elif isinstance(exc, TimeoutError) and deadline.expired():
            error_type = AGENT_TIMEOUT
            error = f"agent {task.agent!r} did not finish within {task.timeout_s:g}s and was cancelled"
            retriable = True
            ctx.logger.warning("%s", error)
        else:
            kind = exc.kind if isinstance(exc, CalmrunError) else None
            error_type = kind.value if kind is not None else type(exc).__name__
            # a provider may repeat the API key it was sent: no key reaches results, events, the DLQ or logs
            error = models.redact(str(exc) or error_type)[:MAX_ERROR_CHARS]
            tb = models.redact("".join(traceback.format_exception(exc)))[-MAX_TRACEBACK_CHARS:]
            retriable = exc.retriable if isinstance(exc, CalmrunError) else True
            retry_after = retry_after_ms(exc)
            if on_failure is not None:
                on_failure(exc)
            clean = scrub or str
            ctx.logger.warning(
                "agent %r failed: %s: %s (retriable=%s)%s",
                task.agent,
                error_type,
                clean(error),
                retriable,
                "" if isinstance(exc, CalmrunError) else "\n" + clean(tb),
            )
    latency_ms = (time.monotonic() - t0) * 1000
    if on_journal is not None and ctx.journal is not None and ctx.journal.entries:
        on_journal(ctx)
    if journal is not None:
        journal.forget(task.idempotency_key)
    if task.approvals:  # a resumed pause: what the pauses reported is not counted twice
        ctx.unbill_replayed(max(int(a.get("billed") or 0) for a in task.approvals.values()))
    cost = ctx.cost(
        latency_ms=latency_ms,
        queue_wait_ms=float(max(0, started_ms - task.issued_ms)),
        pricing=pricing,
        agent=task.agent,
    )
    return StepResult(
        run_id=task.run_id,
        step=task.step,
        attempt=task.attempt,
        at_ms=now_ms(),
        kind=task.kind,
        output=output,
        error_type=error_type,
        error=error,
        retriable=retriable,
        cost=cost,
        traceback=tb,
        retry_after_ms=retry_after,
        element=task.element,
    )


class Deadline:
    """An attempt's timeout of ``delay_s``, made (``asyncio.timeout``) only once ``under`` arms it."""

    __slots__ = ("delay_s", "timeout")

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.timeout: asyncio.Timeout | None = None

    def expired(self) -> bool:
        """Did the armed timeout expire (and cancel what it guarded)?"""
        return self.timeout is not None and self.timeout.expired()


async def under(deadline: Deadline, coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` under ``deadline``, arming its timer only once ``coro`` suspends: an agent that returns
    without waiting for anything (a plain function's) needs no timer, and a timer was a tenth of an attempt's
    CPU (making one, unarmed, another fiftieth of the worker's). Code before the first suspension cannot be
    interrupted by a timer anyway."""
    try:
        first = coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    deadline.timeout = asyncio.timeout(deadline.delay_s)
    async with deadline.timeout:
        return await _resumed(coro, first)


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, T], first: Any) -> Generator[Any, Any, T]:
    """``await coro`` once its first step was taken (and yielded ``first``): what ``yield from`` does."""
    value = first
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation (the deadline's too): into the agent, as await does
            try:
                value = coro.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                value = coro.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

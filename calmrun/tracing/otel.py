"""Tracing on: the shell's hooks (``calmrun.tracing.port``) as OpenTelemetry spans, exported with OTLP.

A run's trace (``docs/traces.md``)::

    run <workflow>                      root; made when the run ends, from its creation to its end
    ├─ decide <input>                   one per decision: decided -> its transaction committed
    ├─ attempt <step>#<n>               issued -> its result committed, in the process that ran it
    │  ├─ queue                         issued -> started
    │  ├─ execute                       the agent; pydantic-ai's agent and model-request spans inside
    │  └─ commit                        result -> committed (the decision, or a pool's result record)
    └─ wait <approval|signal|timer> <step>   made when the wait ends (an answer, a signal, a retry timer)

Every span's trace ID and its parent, the root span, come from ``calmrun.tracing.ids.run_ids``: nothing is
looked up or carried in the run's state, so a run crossing workers and restarts stays one trace. The
spans are made when what they describe is committed, so a batch decided again after a crash does not
show twice; an attempt run twice (a crash before its result committed) shows twice, as it happened.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, StatusCode, TraceFlags
from pydantic_ai.models import Model
from pydantic_ai.models.instrumented import InstrumentationSettings, InstrumentedModel

from calmrun.agents import ModelRegistry
from calmrun.settings import Settings
from calmrun.tracing.ids import TRACEPARENT, SpanRef, parse_traceparent, run_ids
from calmrun.tracing.port import Headers, Tracing
from calmrun.workflow.decider import Decision
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import (
    Answer,
    CancelRequested,
    DeciderInput,
    MigrateRequested,
    RedriveRequested,
    RunRequested,
    SignalReceived,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.tracing")

MAX_OPEN = 10_000
"""Attempt spans waiting for their commit, at most; the oldest beyond it end, marked uncommitted."""
_LOW64 = (1 << 64) - 1
_MS = 1_000_000
_INPUTS: dict[type, str] = {
    RunRequested: "request",
    StepResult: "result",
    TimerFired: "timer",
    Answer: "answer",
    SignalReceived: "signal",
    CancelRequested: "cancel",
    RedriveRequested: "redrive",
    MigrateRequested: "migrate",
}
_ROOT: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("calmrun_root", default=None)

AttemptKey = tuple[str, str, int, str]


class _RunIds(RandomIdGenerator):
    """Random IDs, except for a run's root span: its derived trace and span ID (``ids.run_ids``)."""

    def generate_span_id(self) -> int:
        root = _ROOT.get()
        return root[1] if root is not None else super().generate_span_id()

    def generate_trace_id(self) -> int:
        root = _ROOT.get()
        return root[0] if root is not None else super().generate_trace_id()


class _InstrumentedModels(ModelRegistry):
    """The same aliases and built models, each wrapped in pydantic-ai's ``InstrumentedModel``."""

    def __init__(self, inner: ModelRegistry, instrumentation: InstrumentationSettings) -> None:
        vars(self).update(vars(inner))  # shares the inner registry's aliases and its cache of built models
        self._instrumentation = instrumentation
        self._wrapped: dict[str, Model] = {}

    def resolve(self, alias: str) -> Model:
        model = self._wrapped.get(alias)
        if model is None:
            model = self._wrapped[alias] = InstrumentedModel(super().resolve(alias), self._instrumentation)
        return model


def provider_for(settings: Settings, service: str) -> TracerProvider:
    """A tracer provider exporting to ``settings.tracing.endpoint`` in batches (OTLP over HTTP)."""
    t = settings.tracing
    assert t.endpoint is not None
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(t.sampling)),
        resource=Resource.create({"service.name": service, "service.instance.id": uuid.uuid4().hex}),
        id_generator=_RunIds(),
    )
    exporter = OTLPSpanExporter(endpoint=t.endpoint, headers=dict(t.headers))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return provider


class OtelTracing(Tracing):
    """The hooks as OpenTelemetry spans; see the module docstring.

    Args:
        settings: ``tracing`` (endpoint, headers, sampling, service name) and ``kafka.prefix``.
        pool: the pool whose attempts this process runs (an attribute of its attempt spans).
        service: ``service.name`` of this process's spans.
        provider: where spans go (by default ``provider_for(settings, service)``, closed with this).
    """

    enabled = True

    def __init__(
        self, settings: Settings, *, pool: str | None, service: str, provider: TracerProvider | None = None
    ) -> None:
        self._prefix, self._pool = settings.kafka.prefix, pool
        self._provider = provider or provider_for(settings, service)
        self._tracer = self._provider.get_tracer("calmrun")
        self._bound = TraceIdRatioBased(settings.tracing.sampling).bound
        self._instrumentation = InstrumentationSettings(
            tracer_provider=self._provider, include_content=settings.tracing.include_content
        )
        self._models: ModelRegistry | None = None
        self._open: dict[AttemptKey, tuple[Span, Span]] = {}  # attempt -> (its span, its commit span)
        self._retry_since: dict[tuple[str, str], int] = {}  # (run, step) -> ms its retry wait began

    # -- the hooks ----------------------------------------------------------------------------------

    def models(self, models: ModelRegistry) -> ModelRegistry:
        self._models = models
        return _InstrumentedModels(models, self._instrumentation)

    def task_headers(self, task: StepTask) -> Headers:
        return ((TRACEPARENT, self._root(task.run_id).header()),)

    async def attempt(self, task: StepTask, run: Callable[[], Awaitable[StepResult]]) -> StepResult:
        now = time.time_ns()
        issued = min(task.issued_ms * _MS, now)
        attrs = {**_task_attrs(task), "calmrun.pool": self._pool or "", "calmrun.agent": task.agent}
        name = f"attempt {task.step}#{task.attempt}" + (" compensate" if task.kind == "compensate" else "")
        span = self._tracer.start_span(name, self._context(task.run_id), start_time=issued, attributes=attrs)
        inside = trace.set_span_in_context(span)
        self._tracer.start_span("queue", inside, start_time=issued).end(end_time=now)
        try:
            with self._tracer.start_as_current_span("execute", inside, end_on_exit=True):
                result = await run()
        except BaseException:  # cancelled (shutdown, lost partition): the attempt runs again elsewhere
            span.set_attribute("calmrun.committed", False)
            span.set_status(StatusCode.ERROR, "cancelled")
            span.end()
            raise
        span.set_attributes(self._result_attrs(task, result))
        if result.error_type is not None:
            span.set_status(StatusCode.ERROR, f"{result.error_type}: {result.error or ''}"[:500])
        self._keep(_key(task.run_id, task.step, task.attempt, task.kind), span, inside)
        return result

    def result_headers(self, task: StepTask) -> Headers:
        held = self._open.get(_key(task.run_id, task.step, task.attempt, task.kind))
        if held is None:
            return ()
        ctx = held[0].get_span_context()
        return ((TRACEPARENT, SpanRef(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled).header()),)

    def result_committed(self, task: StepTask) -> None:
        self._committed(_key(task.run_id, task.step, task.attempt, task.kind))

    def decision(
        self,
        wf: WorkflowDef,
        before: RunState | None,
        inp: DeciderInput,
        decision: Decision,
        headers: Sequence[tuple[str, bytes]],
    ) -> Callable[[], None] | None:
        started = time.time_ns()
        parent = parse_traceparent(next((bytes(v) for k, v in headers if k == TRACEPARENT), None))

        def committed() -> None:
            self._decided(wf, before, inp, decision, parent, started)

        return committed

    def close(self) -> None:
        for key in list(self._open):
            self._committed(key, committed=False)
        self._provider.shutdown()  # exports what is queued

    # -- spans --------------------------------------------------------------------------------------

    def _decided(
        self,
        wf: WorkflowDef,
        before: RunState | None,
        inp: DeciderInput,
        d: Decision,
        parent: SpanRef | None,
        started: int,
    ) -> None:
        end = time.time_ns()
        run_id, after = inp.run_id, d.state
        state = after or before
        attrs: dict[str, Any] = {
            "calmrun.run_id": run_id,
            "calmrun.workflow": wf.name,
            "calmrun.version": state.version if state is not None else wf.version,
            "calmrun.tenant": state.tenant if state is not None else "default",
            "calmrun.input": _INPUTS.get(type(inp), type(inp).__name__),
            "calmrun.events": [ev.type for ev in d.events],
            "calmrun.tasks": len(d.tasks),
        }
        what = attrs["calmrun.input"]
        if isinstance(inp, StepResult | Answer):
            attrs["calmrun.step"] = inp.step
            what += f" {inp.step}" + (f"#{inp.attempt}" if isinstance(inp, StepResult) else "")
        links = [Link(SpanContext(parent.trace_id, parent.span_id, True))] if parent is not None else []
        span = self._tracer.start_span(
            f"decide {what}", self._context(run_id), start_time=started, attributes=attrs, links=links
        )
        span.end(end_time=end)
        if isinstance(inp, StepResult):
            self._committed(_key(run_id, inp.step, inp.attempt, inp.kind))
        if after is None:
            return
        self._waits(wf, before, after, inp.at_ms, end)
        if after.is_terminal() and (before is None or not before.is_terminal()):
            self._run_span(wf, after, end)

    def _waits(self, wf: WorkflowDef, before: RunState | None, after: RunState, at_ms: int, end: int) -> None:
        """Spans of the waits this decision ended; remember when the retry waits it began started."""
        run_id = after.run_id
        for name, st in after.steps.items():
            was = before.steps.get(name) if before is not None else None
            if st.status == "retry_wait" and (was is None or was.status != "retry_wait"):
                if len(self._retry_since) >= MAX_OPEN:
                    self._retry_since.pop(next(iter(self._retry_since)))
                self._retry_since[(run_id, name)] = at_ms
        for name, was in before.steps.items() if before is not None else ():
            if was.status not in ("waiting", "retry_wait"):
                continue
            now = after.steps.get(name)
            if now is not None and (now.status, now.attempt) == (was.status, was.attempt):
                continue  # still waiting
            if was.status == "retry_wait":
                kind, since = "timer", self._retry_since.pop((run_id, name), was.scheduled_ms)
            else:
                step = next((s for s in wf.steps if s.name == name), None)
                kind = "approval" if step is not None and step.kind == "approval" else "signal"
                since = was.scheduled_ms
            attrs: dict[str, Any] = {
                "calmrun.run_id": run_id,
                "calmrun.workflow": after.workflow,
                "calmrun.version": after.version,
                "calmrun.tenant": after.tenant,
                "calmrun.step": name,
                "calmrun.attempt": was.attempt,
                "calmrun.wait": kind,
                "calmrun.wait_outcome": now.status if now is not None else "",
            }
            start = min(since * _MS, end)
            span = self._tracer.start_span(
                f"wait {kind} {name}", self._context(run_id), start_time=start, attributes=attrs
            )
            span.end(end_time=end)

    def _run_span(self, wf: WorkflowDef, state: RunState, end: int) -> None:
        """The run's root span, with its derived IDs (``ids.run_ids``), from its creation to now."""
        token = _ROOT.set(run_ids(self._prefix, state.run_id))
        try:
            span = self._tracer.start_span(
                f"run {wf.name}",
                Context(),  # no parent: the root
                start_time=min(state.created_ms * _MS, end),
                attributes={
                    "calmrun.run_id": state.run_id,
                    "calmrun.workflow": state.workflow,
                    "calmrun.version": state.version,
                    "calmrun.tenant": state.tenant,
                    "calmrun.status": state.status,
                    "calmrun.outcome": state.outcome or "",
                    "calmrun.cost_usd": float(state.spent_usd),
                },
            )
        finally:
            _ROOT.reset(token)
        if state.status not in ("completed", "cancelled"):
            span.set_status(StatusCode.ERROR, f"{state.status}: {state.error_type or ''}")
        span.end(end_time=end)

    def _keep(self, key: AttemptKey, span: Span, inside: Context) -> None:
        """Hold an attempt span, with its commit span started, until its result is committed."""
        old = self._open.pop(key, None)
        if old is not None:  # the same attempt ran twice here: the first one's result was never committed
            self._end(old, committed=False)
        if len(self._open) >= MAX_OPEN:
            self._end(self._open.pop(next(iter(self._open))), committed=False)
        self._open[key] = (span, self._tracer.start_span("commit", inside))

    def _committed(self, key: AttemptKey, *, committed: bool = True) -> None:
        held = self._open.pop(key, None)
        if held is not None:
            self._end(held, committed=committed)

    @staticmethod
    def _end(held: tuple[Span, Span], *, committed: bool) -> None:
        span, commit = held
        span.set_attribute("calmrun.committed", committed)
        commit.end()
        span.end()

    def _result_attrs(self, task: StepTask, result: StepResult) -> dict[str, Any]:
        c = result.cost
        attrs: dict[str, Any] = {
            "gen_ai.usage.input_tokens": c.tokens_in,
            "gen_ai.usage.output_tokens": c.tokens_out,
            "calmrun.cost_usd": float(c.cost_usd),
            "calmrun.requests": c.requests,
            "calmrun.outcome": "error" if result.error_type is not None else "ok",
        }
        if c.price_source is not None:
            attrs["calmrun.price_source"] = c.price_source
        if result.error_type is not None:
            attrs["error.type"] = result.error_type
        if task.model is not None:
            attrs["calmrun.model_alias"] = task.model
            model = self._model_name(task.model)
            attrs["gen_ai.request.model"] = model.split(":", 1)[-1]
            attrs["gen_ai.provider.name"] = model.split(":", 1)[0]
        return attrs

    def _model_name(self, alias: str) -> str:
        if self._models is None or alias not in self._models:
            return alias
        return self._models.config(alias).model

    # -- contexts -----------------------------------------------------------------------------------

    def _root(self, run_id: str) -> SpanRef:
        trace_id, span_id = run_ids(self._prefix, run_id)
        return SpanRef(trace_id, span_id, (trace_id & _LOW64) < self._bound)

    def _context(self, run_id: str) -> Context:
        """A context whose current span is the run's root (remote: it is made when the run ends)."""
        root = self._root(run_id)
        flags = TraceFlags(TraceFlags.SAMPLED if root.sampled else TraceFlags.DEFAULT)
        parent = SpanContext(root.trace_id, root.span_id, is_remote=True, trace_flags=flags)
        return trace.set_span_in_context(NonRecordingSpan(parent))


def _key(run_id: str, step: str, attempt: int, kind: str) -> AttemptKey:
    return (run_id, step, attempt, kind)


def _task_attrs(task: StepTask) -> dict[str, Any]:
    return {
        "calmrun.run_id": task.run_id,
        "calmrun.workflow": task.workflow,
        "calmrun.version": task.version,
        "calmrun.step": task.step,
        "calmrun.attempt": task.attempt,
        "calmrun.kind": task.kind,
        "calmrun.tenant": task.tenant,
    }

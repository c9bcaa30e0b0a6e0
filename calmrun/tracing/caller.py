"""The caller's trace, carried on the requests and commands a client writes (``calmrun.client``).

A service that starts or answers a run inside a span of its own (an HTTP handler, a queue consumer) gets
its span linked from the run's decision on that record: the run keeps its own trace (``calmrun.tracing.ids``)
and the link leads from there to the caller's trace.
"""

from __future__ import annotations

from calmrun.tracing.ids import TRACEPARENT, SpanRef


def caller_headers() -> list[tuple[str, bytes]]:
    """``[("traceparent", ...)]`` of the span current in the caller, or ``[]`` when there is none."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api comes with pydantic-ai
        return []
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return []
    return [(TRACEPARENT, SpanRef(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled).header())]

"""A run's trace identity and the W3C ``traceparent`` header: pure functions, no OpenTelemetry import.

A run's trace ID and the span ID of its root span are derived from the topic prefix and the run ID, so
every worker, pool executor and restart that touches the run computes the same trace without reading
anything: nothing is added to the run's state or its records' schemas, a replay of the run into another
prefix lands in a trace of its own, and the sampling decision (from the trace ID) is the same everywhere.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

TRACEPARENT = "traceparent"
"""The W3C Trace Context header on tasks, results, requests and commands (``docs/traces.md``)."""

_PARENT = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class SpanRef:
    """One span's identity as it travels in a ``traceparent``: trace ID, span ID, sampled flag."""

    trace_id: int
    span_id: int
    sampled: bool

    def header(self) -> bytes:
        """``00-<trace id>-<span id>-<flags>``, the W3C ``traceparent`` value."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}".encode()


def run_ids(prefix: str, run_id: str) -> tuple[int, int]:
    """The trace ID of run ``run_id`` under topic prefix ``prefix``, and its root span's ID (never 0)."""
    digest = hashlib.sha256(f"calmrun-trace\0{prefix}\0{run_id}".encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return trace_id, span_id


def parse_traceparent(value: bytes | None) -> SpanRef | None:
    """The span a ``traceparent`` value names, or None when it is absent or malformed (then ignored)."""
    if value is None:
        return None
    m = _PARENT.match(value.strip().lower())
    if m is None:
        return None
    trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return SpanRef(trace_id, span_id, bool(int(m.group(3), 16) & 1))

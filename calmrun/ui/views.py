"""What each view shows, as JSON-ready dicts, built from the index (pure functions, no Kafka).

Payloads (run input, step outputs, dead-letter bytes) are redacted for viewers; causes and errors are not.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from typing import Any

from calmrun.errors import DecodeError, InputMappingError
from calmrun.replay.recorded import path_of
from calmrun.wire.codec import RecordCodec
from calmrun.workflow.decider import resolve_input
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import RunEvent
from calmrun.workflow.state import RunState

REDACTED = "[redacted]"
_PAYLOAD_KEYS = ("input", "output", "outputs")
_PRINTABLE = set(string.printable) - set("\x0b\x0c")


def redact_state(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    out["input"] = REDACTED
    out["steps"] = {
        name: {**st, "output": REDACTED if st.get("output") is not None else None}
        for name, st in state.get("steps", {}).items()
    }
    return out


def redact_event(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data") or {}
    if not any(k in data for k in _PAYLOAD_KEYS):
        return event
    return {**event, "data": {k: (REDACTED if k in _PAYLOAD_KEYS else v) for k, v in data.items()}}


def attempts(events: list[RunEvent]) -> list[dict[str, Any]]:
    """One row per step attempt for the waterfall: issued, started, finished, cost, output or error.

    An attempt's start is its result's time minus its latency (the worker measures the attempt); its
    wait is the queue wait the worker recorded (issued -> started).
    """
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    order: list[tuple[str, str, int]] = []
    for e in events:
        if e.step is None or e.attempt is None:
            continue
        if e.type in ("step.scheduled", "step.compensation_scheduled"):
            kind = "run" if e.type == "step.scheduled" else "compensate"
            key = (e.step, kind, e.attempt)
            if key not in rows:
                order.append(key)
                rows[key] = {
                    "step": e.step,
                    "kind": kind,
                    "attempt": e.attempt,
                    "agent": e.data.get("agent"),
                    "model": e.data.get("model"),
                    "scheduled_ms": e.at_ms,
                    "status": "running",
                }
        elif e.type in ("step.succeeded", "step.failed"):
            kind = str(e.data.get("kind", "run"))
            key = (e.step, kind, e.attempt)
            row = rows.get(key)
            if row is None:
                order.append(key)
                row = rows[key] = {
                    "step": e.step,
                    "kind": kind,
                    "attempt": e.attempt,
                    "scheduled_ms": e.at_ms,
                }
            c = e.cost
            row.update(
                status="succeeded" if e.type == "step.succeeded" else "failed",
                end_ms=e.at_ms,
                latency_ms=c.latency_ms if c else 0.0,
                wait_ms=c.queue_wait_ms if c else 0.0,
                start_ms=e.at_ms - (c.latency_ms if c else 0.0),
                tokens_in=c.tokens_in if c else 0,
                tokens_out=c.tokens_out if c else 0,
                requests=c.requests if c else 0,
                api_calls=c.api_calls if c else 0,
                cost_usd=str(c.cost_usd) if c else "0",
                price_source=c.price_source if c else None,
                output=e.data.get("output"),
                error_type=e.data.get("error_type"),
                error=e.data.get("error"),
            )
            if c and c.model:
                row["model"] = c.model
        elif e.type == "step.cancelled":
            row = rows.get((e.step, "run", e.attempt))
            if row is not None and row.get("status") == "running":
                row.update(status="cancelled", end_ms=e.at_ms)
    return [rows[k] for k in order]


def family(
    state: RunState | None, events: list[RunEvent], lookup: Callable[[str], RunState | None]
) -> dict[str, Any]:
    """The run's parent and children (``kind: workflow``), as ``calmrun status`` shows them.

    The parent comes from ``RunState.parent``; each child from its ``step.child_started`` event, with its
    status, outcome and spend from the child's own state when the index has it, else from the parent's
    ``step.child_finished`` event, else ``started``.
    """
    parent: dict[str, Any] | None = None
    if state is not None and state.parent:
        p = state.parent
        ps = lookup(str(p.get("run_id")))
        parent = {
            "run_id": p.get("run_id"),
            "workflow": p.get("workflow"),
            "step": p.get("step"),
            "status": ps.status if ps is not None else None,
        }
    finished = {str(e.data.get("child_run_id")): e.data for e in events if e.type == "step.child_finished"}
    children: list[dict[str, Any]] = []
    for e in events:
        if e.type != "step.child_started":
            continue
        rid = str(e.data.get("child_run_id"))
        cs = lookup(rid)
        done = finished.get(rid, {})
        children.append(
            {
                "run_id": rid,
                "step": e.step,
                "workflow": e.data.get("workflow"),
                "status": cs.status if cs is not None else done.get("status", "started"),
                "outcome": cs.outcome if cs is not None else done.get("outcome"),
                "spent_usd": str(cs.spent_usd) if cs is not None else None,
            }
        )
    return {"parent": parent, "children": children}


def step_inputs(wf: WorkflowDef, state: RunState) -> dict[str, Any]:
    """Each step's input, from the definition's mapping over the run input and the recorded outputs.

    The events do not carry an attempt's input (the step task record does); with the run's definition it
    is what the decider resolved when it issued the attempt (every attempt of a step gets the same input).
    A step whose mapping cannot be resolved (it never ran) is left out.
    """
    out: dict[str, Any] = {}
    for name in state.steps:
        try:
            out[name] = resolve_input(wf, state, name)
        except (InputMappingError, KeyError):
            continue
    return out


def request_rows(entries: list[Any], redact: bool) -> list[dict[str, Any]]:
    """One timeline row per journaled model request or tool call (``agents.journal.Entry``), in order.

    A tool call's label names its arguments, which are payload: viewers see the tool's name only.
    """
    rows = []
    for e in entries:
        label = e.call.label.split("(", 1)[0] if redact else e.call.label
        rows.append(
            {
                "step": e.step,
                "attempt": e.attempt,
                "position": e.position,
                "op": e.call.op,
                "label": label,
                "model": e.model,
                "tokens_in": e.usage.input_tokens,
                "tokens_out": e.usage.output_tokens,
                "latency_ms": e.latency_ms,
                "start_ms": e.at_ms - round(e.latency_ms),
                "end_ms": e.at_ms,
            }
        )
    return rows


def run_view(
    state: RunState | None,
    events: list[RunEvent],
    dead: list[dict[str, Any]],
    redact: bool,
    inputs: dict[str, Any] | None = None,
    entries: list[Any] | None = None,
) -> dict[str, Any]:
    """The Run view: state, events, the attempts of the waterfall (with each agent's journaled requests and
    tool calls under their attempt, from ``entries``), the path and the run's dead letters."""
    st = state.model_dump(mode="json") if state is not None else None
    evs = [e.model_dump(mode="json") for e in events]
    rows = attempts(events)
    for r in rows:
        if inputs and r["kind"] == "run" and r["step"] in inputs:
            r["input"] = REDACTED if redact else inputs[r["step"]]
    if redact:
        st = redact_state(st) if st is not None else None
        evs = [redact_event(e) for e in evs]
        for r in rows:
            if r.get("output") is not None:
                r["output"] = REDACTED
    t0 = events[0].at_ms if events else (state.created_ms if state else 0)
    t1 = max([e.at_ms for e in events] + [t0])
    return {
        "state": st,
        "events": evs,
        "attempts": rows,
        "requests": request_rows(entries or [], redact),
        "path": path_of(events),
        "start_ms": t0,
        "end_ms": t1,
        "dead_letters": [dead_letter(d, redact) for d in dead],
    }


def dead_letter(row: dict[str, Any], redact: bool, codec: RecordCodec | None = None) -> dict[str, Any]:
    value: bytes | None = row.get("value")
    out = {k: v for k, v in row.items() if k != "value"}
    out["size"] = len(value) if value is not None else 0
    out["headers"] = json.loads(row["headers"]) if isinstance(row.get("headers"), str) else row.get("headers")
    out["preview"] = REDACTED if redact and value else preview(value, codec)
    return out


def preview(value: bytes | None, codec: RecordCodec | None = None, limit: int = 2000) -> str:
    """A safe text preview of a record's bytes: decoded Avro, UTF-8 text, else a hex dump.

    Never raises on any input (non-UTF-8 bytes, truncated Avro, NUL bytes).
    """
    if value is None:
        return "(no value)"
    if codec is not None and value[:2] == b"\xc3\x01":
        try:
            rec = codec.decode(value)
            return _cut(json.dumps(rec.model_dump(mode="json"), indent=1, default=str), limit)
        except (DecodeError, KeyError, ValueError):
            pass
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch in _PRINTABLE or ord(ch) > 127 for ch in text):
        return _cut(text, limit)
    return f"{len(value)} bytes, not UTF-8 text:\n" + hexdump(value[: limit // 4])


def hexdump(data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hx = " ".join(f"{b:02x}" for b in chunk)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{i:04x}  {hx:<47}  {asc}")
    return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"

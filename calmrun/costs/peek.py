"""Reading run events cheaply for the fold: the type from the first bytes, two fields from ``data``'s text.

The aggregator decodes only the events the fold uses; these helpers find out which without decoding, and
read the ``kind`` of an attempt and the ``agent`` of a scheduled step from the JSON text the decider writes
(falling back to parsing it when it is not in that shape).
"""

from __future__ import annotations

import json
from typing import Any

COST_EVENTS = frozenset({"step.succeeded", "step.failed"})
SCHEDULED = frozenset({"step.scheduled", "step.compensation_scheduled"})
ESCALATED = "step.escalated"
CHILD_STARTED = "step.child_started"
"""A ``kind: workflow`` step started a child run: the parent's run record lists it (``children``)."""
LOOPED, MAPPED = "step.looped", "step.mapped"
"""A loop went back (its body steps' ``iterations``); a map read its list (the step's ``elements``)."""


def wire_dict(ev: Any) -> dict[str, Any]:
    """A ``RunEvent`` in the shape the Avro decoder gives the fold (tests and benches fold models too)."""
    d: dict[str, Any] = ev.model_dump()
    d["data"] = json.dumps(d["data"])
    if d["cost"] is not None:
        d["cost"]["cost_usd"] = str(d["cost"]["cost_usd"])
    return d


def task_kind(data: str | None) -> str:
    """``run`` or ``compensate`` from an attempt event's JSON ``data`` (its first key, as written)."""
    if not data or data == "{}":
        return "run"
    if data.startswith('{"kind":"run"'):
        return "run"
    if data.startswith('{"kind":"compensate"'):
        return "compensate"
    return str(json.loads(data).get("kind", "run"))


FOLDED_TYPES = frozenset(
    t.encode() for t in (*COST_EVENTS, *SCHEDULED, ESCALATED, CHILD_STARTED, LOOPED, MAPPED)
)


def folded_type(body: bytes, header: bytes) -> bool | None:
    """Whether a ``RunEvent`` single object is one the fold uses, from its first fields, without decoding.

    ``RunEvent``'s Avro record starts with ``run_id`` (string), ``seq`` (long), ``type`` (string).
    Returns None when ``body`` does not start with ``header`` (another schema, or not Avro): decode it.
    """
    if not body.startswith(header):
        return None
    try:
        n, i = _varint(body, len(header))
        _, i = _varint(body, i + n)
        n, i = _varint(body, i)
    except IndexError:
        return None
    return body[i : i + n] in FOLDED_TYPES


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """An Avro (zig-zag) long at ``buf[i:]``: (value, index after it)."""
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), i
        shift += 7


def agent_of(data: str | None) -> str | None:
    """The ``agent`` of a scheduled event's JSON ``data`` (the decider writes it first)."""
    if data and data.startswith('{"agent":"'):
        end = data.find('"', 10)
        if end > 10 and "\\" not in data[10:end]:
            return data[10:end]
    agent = json.loads(data or "{}").get("agent")
    return agent if isinstance(agent, str) else None

"""Redaction: configured fields of run inputs and step outputs never leave the run state.

``redact: [input.customer.email, steps.extract.order_id]`` names fields the way workflow input mappings
do: ``input.<path>`` in the run input, ``steps.<step>.<path>`` in a step's output (lists are walked
element by element). Before the worker writes an event or a dead letter, and when a snapshot is made,
those fields are replaced by :data:`MASK`, and every *other* occurrence of their values (a step's input
mapped from them, an error message or a traceback quoting them) is replaced too.

What keeps the values: the requests topic (the caller wrote them), the step topics (an agent needs its
input) and the state topic (the next step needs them): protect those with ACLs. A dead letter that cannot
be decoded is kept byte for byte (its fields cannot be found); one that decodes is stored redacted, so
``calmrun dlq redrive`` re-injects the redacted record (resubmit from the source offset it names instead).
Recorded replay re-decides from the redacted events and converges unless a branch reads a redacted field;
live replay runs agents on the redacted input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from calmrun.errors import CalmrunError
from calmrun.wire.codec import RecordCodec
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.events import RunEvent, RunRequest
from calmrun.workflow.state import RunState

MASK = "[redacted]"
MIN_LEN = 4
"""Shorter values are masked at their paths but not searched for elsewhere (they would match anywhere)."""


@dataclass(frozen=True)
class _Path:
    step: str | None  # None: the run input
    keys: tuple[str, ...]


def parse_path(text: str) -> _Path:
    """``input.a.b`` or ``steps.S.a``.

    Raises:
        ValueError: another root, or no field named.
    """
    parts = text.split(".")
    if parts[0] == "input" and len(parts) >= 2 and all(parts[1:]):
        return _Path(None, tuple(parts[1:]))
    if parts[0] == "steps" and len(parts) >= 3 and all(parts[1:]):
        return _Path(parts[1], tuple(parts[2:]))
    raise ValueError(f"redact path {text!r}: use input.<field>... or steps.<step>.<field>...")


def _mask(value: Any, keys: tuple[str, ...], found: list[Any]) -> Any:
    """``value`` with the field at ``keys`` replaced by MASK (a copy); the replaced values go to ``found``."""
    if isinstance(value, list):
        return [_mask(v, keys, found) for v in value]
    if not keys or not isinstance(value, dict) or keys[0] not in value:
        return value
    head, rest = keys[0], keys[1:]
    out = dict(value)
    if rest:
        out[head] = _mask(value[head], rest, found)
    else:
        found.append(value[head])
        out[head] = MASK
    return out


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif value is not None and not isinstance(value, bool):
        yield value


class Redactor:
    """Applies the configured paths; stateless between calls (the values come with each call's run state).

    Args:
        paths: ``settings.redact``.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = [parse_path(p) for p in paths]

    @property
    def active(self) -> bool:
        return bool(self.paths)

    # -- the structured places ----------------------------------------------------------------------

    def input(self, data: dict[str, Any], found: list[Any]) -> dict[str, Any]:
        for p in self.paths:
            if p.step is None:
                data = _mask(data, p.keys, found)
        return data

    def output(self, step: str, data: Any, found: list[Any]) -> Any:
        for p in self.paths:
            if p.step == step:
                data = _mask(data, p.keys, found)
        return data

    def secrets(self, state: RunState | None) -> list[Any]:
        """The values at the configured paths in a run's state (its input and step outputs)."""
        found: list[Any] = []
        if state is not None and self.paths:
            self.input(state.input, found)
            for name, st in state.steps.items():
                if st.output is not None:
                    self.output(name, st.output, found)
        return found

    # -- the free text -------------------------------------------------------------------------------

    @staticmethod
    def scrub(value: Any, found: Iterable[Any]) -> Any:
        """``value`` with every string occurrence of the ``found`` values (their leaves, as text) replaced.

        Numbers are masked at their paths; elsewhere only where they appear inside a string.
        """
        texts = {
            str(leaf) for v in found for leaf in _leaves(v) if leaf != MASK and len(str(leaf)) >= MIN_LEN
        }
        if not texts:
            return value
        return _deep(value, sorted(texts, key=len, reverse=True))

    # -- what the worker writes ---------------------------------------------------------------------

    def event(self, ev: RunEvent, state: RunState | None) -> RunEvent:
        """The event as it may be written: fields masked, their values scrubbed from everything else."""
        if not self.paths:
            return ev
        found = self.secrets(state)
        data = dict(ev.data)
        if isinstance(data.get("input"), dict):
            data["input"] = self.input(data["input"], found)
        if ev.step is not None and "output" in data:
            data["output"] = self.output(ev.step, data["output"], found)
        if isinstance(data.get("outputs"), dict):
            data["outputs"] = {s: self.output(s, o, found) for s, o in data["outputs"].items()}
        return ev.model_copy(update={"data": self.scrub(data, found)})

    def dlq(self, rec: DlqRecord, state: RunState | None, codec: RecordCodec) -> DlqRecord:
        """The dead letter as it may be written: the decoded value redacted and re-encoded, texts scrubbed."""
        if not self.paths:
            return rec
        found = self.secrets(state)
        value = rec.value
        if value is not None:
            try:
                original = codec.decode(value)
            except CalmrunError:
                original = None  # undecodable: kept as it was read (no field can be found in it)
            if original is not None:
                value = self._record(original, state, found, codec) or value
        texts = self.scrub({"error": rec.error, "traceback": rec.traceback}, found)
        return rec.model_copy(update={"value": value, **texts})

    def _record(
        self, original: BaseModel, state: RunState | None, found: list[Any], codec: RecordCodec
    ) -> bytes | None:
        """A decoded dead letter's value, redacted and re-encoded; None when nothing in it changed."""
        if isinstance(original, RunEvent):
            changed: BaseModel = self.event(original, state)
        else:
            dump = original.model_dump(mode="python")
            if isinstance(original, RunRequest):
                dump["input"] = self.input(dump["input"], found)
            elif isinstance(original, RunState):
                found.extend(self.secrets(original))
            changed = type(original).model_validate(self.scrub(dump, found))
        return None if changed == original else codec.encode(changed)

    def state(self, state: RunState) -> RunState:
        """A run's state for a snapshot: input and outputs masked, their values scrubbed elsewhere."""
        if not self.paths:
            return state
        found: list[Any] = []
        data = state.model_dump(mode="python")
        data["input"] = self.input(data["input"], found)
        for name, st in data["steps"].items():
            if st.get("output") is not None:
                st["output"] = self.output(name, st["output"], found)
        return RunState.model_validate(self.scrub(data, found))

    def text(self, message: str, state: RunState | None = None, extra: Iterable[Any] = ()) -> str:
        """A log message without the run's redacted values."""
        if not self.paths:
            return message
        return str(self.scrub(message, [*self.secrets(state), *extra]))


def _deep(value: Any, texts: list[str]) -> Any:
    if isinstance(value, str):
        for t in texts:
            if t in value:
                value = value.replace(t, MASK)
        return value
    if isinstance(value, dict):
        return {k: _deep(v, texts) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep(v, texts) for v in value]
    return value

"""The limits of ``settings.limits`` that are checked once, on workflows and step outputs.

Requests are checked where they are read (``calmrun.streams.requests``); a workflow over a limit is refused
when the worker starts (a step count, fan-out or attempt budget its records could not hold); a step output
over a limit fails its attempt as an invalid output, so the decider retries or escalates it like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic_core import to_json

from calmrun.errors import CalmrunError, ConfigError, InvalidOutputError
from calmrun.settings import LimitsSettings, Settings
from calmrun.wire.jsonfield import check_text, loads
from calmrun.workflow.definition import WorkflowDef, targets
from calmrun.workflow.kinds.loop import LoopStep
from calmrun.workflow.kinds.map import MapStep
from calmrun.workflow.kinds.wait import MAX_BUFFERED, WaitStep
from calmrun.workflow.registry import Definitions, check_children

STEP_OVERHEAD_BYTES = 4_096
"""Room a step takes in the run state beyond its output: status, times, a capped error message."""


def check_served(workflows: Iterable[WorkflowDef], settings: Settings) -> Definitions:
    """The definitions a deciding worker serves, each within ``settings.limits`` (``check_workflow``), their
    child workflows served with them and in no circle (``workflow.registry.check_children``).

    Raises:
        ConfigError: as ``check_workflow`` and ``check_children`` say.
    """
    served = Definitions(check_workflow(wf, settings) for wf in workflows)
    check_children(served.values())
    return served


def check_workflow(wf: WorkflowDef, settings: Settings) -> WorkflowDef:
    """Return ``wf`` if its runs stay within ``settings.limits``; the run state of a run must fit a record.

    Raises:
        ConfigError: more steps than ``max_steps_per_run``, a fan-out wider than ``max_fan_out``, more
            attempts in the worst case than ``max_attempts_per_run``, or a run state that could outgrow
            ``kafka.max_request_size``; the message names the setting to raise.
    """
    lim = settings.limits
    where = f"workflow {wf.name!r}"
    if len(wf.steps) > lim.max_steps_per_run:
        raise ConfigError(
            f"{where} has {len(wf.steps)} steps, over limits.max_steps_per_run ({lim.max_steps_per_run})"
        )
    fans = [targets(wf.first)] + [
        t
        for s in wf.steps
        for t in [targets(s.next), *(targets(b.goto) for b in s.branches)]
        + [targets(x) for _, x in s.exits()]
    ]
    widest = max(len(t) for t in fans)
    if widest > lim.max_fan_out:
        raise ConfigError(
            f"{where} starts {widest} steps at once, over limits.max_fan_out ({lim.max_fan_out})"
        )
    visits = {b: s.max_iterations for s in wf.steps if isinstance(s, LoopStep) for b in s.body(wf)}
    maps = [s for s in wf.steps if isinstance(s, MapStep)]
    for m in maps:
        if m.max_elements > lim.max_map_elements:
            raise ConfigError(
                f"{where} step {m.name!r} takes up to {m.max_elements} elements (max_elements), over "
                f"limits.max_map_elements ({lim.max_map_elements})"
            )
    worst = sum(
        s.retry.max_attempts * max(1, len(s.ladder)) * (2 if s.compensation() else 1) * visits.get(s.name, 1)
        for s in wf.steps
        if not isinstance(s, MapStep)  # a map's elements are bounded by its max_elements instead
    )
    if worst > lim.max_attempts_per_run:
        raise ConfigError(
            f"{where} may make {worst} attempts per run (retries x model ladder x loop iterations), over "
            f"limits.max_attempts_per_run ({lim.max_attempts_per_run})"
        )
    # each signal may keep MAX_BUFFERED payloads in the state
    signals = {s.signal for s in wf.steps if isinstance(s, WaitStep)}
    state = lim.max_request_bytes + (len(wf.steps) + len(signals) * MAX_BUFFERED) * (
        lim.max_output_bytes + STEP_OVERHEAD_BYTES
    )
    # a map's state: each element's output (max_element_bytes) and a comma, in one JSON list
    state += sum(m.max_elements * (m.max_element_bytes + 1) for m in maps)
    if state > settings.kafka.max_request_size:
        raise ConfigError(
            f"{where}: a run state may reach {state:,} bytes (limits.max_request_bytes + (steps + signals "
            f"x {MAX_BUFFERED} kept) x (limits.max_output_bytes + {STEP_OVERHEAD_BYTES}) + each map's "
            "max_elements x max_element_bytes), over "
            "kafka.max_request_size "
            f"({settings.kafka.max_request_size:,}); lower the limits or raise max_request_size (and the "
            "broker's message.max.bytes)"
        )
    return wf


def check_output(output: Any, limits: LimitsSettings, agent: str) -> None:
    """Refuse a step output that calmrun could not store and read back, or that is over the limits.

    Raises:
        InvalidOutputError: not serialisable, bigger than ``max_output_bytes``, deeper than
            ``max_json_depth`` or with a number longer than ``max_number_digits`` (retriable, as every
            invalid output is).
    """
    try:
        data = to_json(output)
    # Broad on purpose: whatever an agent returned that cannot be serialised is an invalid output.
    except Exception as exc:
        raise InvalidOutputError(agent, f"not JSON-serialisable: {exc}") from exc
    if len(data) > limits.max_output_bytes:
        raise InvalidOutputError(
            agent,
            f"output of {len(data):,} bytes is over limits.max_output_bytes ({limits.max_output_bytes:,})",
        )
    # to_json's text is valid JSON: a parse back could refuse only what is over the limits, or nan and inf,
    # which to_json writes as NaN and Infinity. Only a parse tells those from the same words in a string.
    depth, digits = limits.max_json_depth, limits.max_number_digits
    try:
        if b"NaN" in data or b"Infinity" in data:
            loads(data, max_depth=depth, max_digits=digits, what="step output")
        else:
            check_text(data.decode(), max_depth=depth, max_digits=digits, what="step output")
    except CalmrunError as exc:
        raise InvalidOutputError(agent, str(exc)) from exc

"""Recorded replay: the decider re-makes every decision of a run from its recorded inputs.

Agent outputs come from the snapshot (the recorded ``step.succeeded``/``step.failed`` events); nothing is
executed and nothing is written. The verdict is ``converged`` when every decision logs the same events as
the original and the final state is the same, otherwise the first divergent decision with both sides.
Replaying runs in flight against a changed definition is how to learn whether the change is safe for
them (as Temporal's replayer does for workflow code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from calmrun.errors import ReplayError
from calmrun.replay.snapshot import Snapshot
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import (
    INPUT_TYPES,
    Answer,
    DeciderInput,
    MigrateRequested,
    RunEvent,
    SignalReceived,
    StepResult,
)
from calmrun.workflow.history import Resolve, held_from_notes, inputs_from_events
from calmrun.workflow.state import RunState

Verdict = Literal["converged", "diverged"]
# a new version of a definition may replay an old run and still converge: what pins a run is not compared
_NOT_COMPARED = {"version", "digest"}
_PIN_DATA = {"run.requested": ("version", "digest"), "run.migrated": ("from",)}


@dataclass(frozen=True)
class Divergence:
    """The first decision whose replay differs from the record.

    Attributes:
        decision: index of the decision in the run (0 is the run request).
        input: the recorded input that the decision answered, in words.
        seq: the seq of the first event that differs (None: the final state differs).
        original: the recorded events of that decision.
        replay: the events the decider makes now (empty when it ignores the input).
        reason: what differs, in one line.
    """

    decision: int
    input: str
    seq: int | None
    original: list[dict[str, Any]]
    replay: list[dict[str, Any]]
    reason: str


@dataclass(frozen=True)
class RecordedReplay:
    """The verdict of one run's recorded replay."""

    run_id: str
    workflow: str
    recorded_version: str
    replay_version: str
    decisions: int
    events: int
    verdict: Verdict
    original_status: str | None
    replay_status: str | None
    original_path: list[str] = field(default_factory=list)
    replay_path: list[str] = field(default_factory=list)
    divergence: Divergence | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def pick_definition(
    definitions: Sequence[WorkflowDef],
    workflow: str,
    recorded_version: str,
    version: str | None,
    digest: str = "",
) -> WorkflowDef:
    """The definition to replay a run of ``workflow`` against.

    ``version`` given: the definition of that version. Otherwise the one whose version equals the run's
    recorded version, else the last one given for the workflow (a changed definition under test).

    Raises:
        ReplayError: no definition of ``workflow`` (or of ``version``) was given.
    """
    named = [d for d in definitions if d.name == workflow]
    if not named:
        given = sorted({d.name for d in definitions}) or ["none"]
        raise ReplayError(
            f"no definition of workflow {workflow!r} was given (given: {', '.join(given)}); definitions are "
            "not stored in Kafka: pass the workflow's YAML with --workflow FILE"
        )
    if version is not None:
        for d in named:
            if d.version == version:
                return d
        raise ReplayError(
            f"no definition of {workflow!r} has version {version!r} "
            f"(given: {sorted(d.version for d in named)})"
        )
    same = [d for d in named if d.version == recorded_version]
    for d in same:
        if d.digest == digest:
            return d
    return same[0] if same else named[-1]


def resolver(definitions: Sequence[WorkflowDef], workflow: str) -> Resolve:
    """Finds the target of a recorded ``run.migrated`` among ``definitions`` (by version and digest)."""

    def resolve(m: MigrateRequested) -> WorkflowDef | None:
        named = [d for d in definitions if d.name == workflow and d.version == m.version]
        return next((d for d in named if d.digest == m.digest), named[0] if named else None)

    return resolve


def replay_given(
    definitions: Sequence[WorkflowDef], snap: Snapshot, version: str | None = None
) -> RecordedReplay:
    """Recorded replay of ``snap`` with the definitions given: with ``version``, that one decides every
    input; without, the run's own (the one it started on, then each recorded migration's target).

    Raises:
        ReplayError: as ``pick_definition`` and ``replay_recorded``.
    """
    if version is not None:
        return replay_recorded(pick_definition(definitions, snap.workflow, snap.version, version), snap)
    first = snap.events[0] if snap.events else None
    started = str(first.data.get("version", first.version)) if first else snap.version
    digest = str(first.data.get("digest", "")) if first else ""
    wf = pick_definition(definitions, snap.workflow, started, None, digest)
    return replay_recorded(wf, snap, resolver(definitions, snap.workflow))


def replay_recorded(wf: WorkflowDef, snap: Snapshot, resolve: Resolve | None = None) -> RecordedReplay:
    """Re-decide ``snap``'s recorded inputs with ``wf`` and compare every decision with the record.

    ``resolve`` gives the definition a recorded ``run.migrated`` moved the run to, which decides the
    inputs after it (exact replay); without it ``wf`` decides them all (would ``wf`` take the run over?).

    Pure: no Kafka, no clock. The state is compared with the snapshot's state at the seq that state had
    (a run still in flight may have events newer than the state that was read).

    Raises:
        ReplayError: the workflow names differ, or the history does not start with the run request.
    """
    events = snap.events
    if not events or events[0].type != "run.requested":
        raise ReplayError(
            f"run {snap.run_id!r}: its history does not start with run.requested", run_id=snap.run_id
        )
    if wf.name != snap.workflow:
        raise ReplayError(
            f"run {snap.run_id!r} is a {snap.workflow!r} run, not {wf.name!r}", run_id=snap.run_id
        )
    groups = _decisions(events)
    inputs = inputs_from_events(events)
    if len(inputs) != len(groups):
        raise ReplayError(
            f"run {snap.run_id!r}: {len(inputs)} inputs rebuilt from {len(groups)} recorded decisions",
            run_id=snap.run_id,
        )
    state: RunState | None = None
    at_seq: dict[int, list[RunState]] = {}  # every state the replay passed through at each seq
    notes = held_from_notes(snap.notes)
    replayed: list[RunEvent] = []
    divergence: Divergence | None = None
    for i, (inp, group) in enumerate(zip(inputs, groups, strict=True)):
        if isinstance(inp, MigrateRequested) and resolve is not None:
            wf = resolve(inp) or wf
        d = decide(wf, state, inp)
        want = [_norm(e) for e in group]
        if d.ignored is not None:
            divergence = Divergence(
                i,
                describe_input(inp),
                group[0].seq,
                want,
                [],
                f"the decider now ignores this input: {d.ignored}",
            )
            break
        got = [_norm(e) for e in d.events]
        if got != want:
            j = next(
                (k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want))
            )
            seq = want[j]["seq"] if j < len(want) else (got[j]["seq"] if j < len(got) else None)
            divergence = Divergence(i, describe_input(inp), seq, want, got, _why(want, got, j))
            replayed.extend(d.events)
            break
        replayed.extend(d.events)
        state = d.state
        if state is not None:
            at_seq[state.seq] = [state]
            # the commands held (and released) while the run rested at this seq
            while notes and notes[0][0] <= state.seq:
                _, note = notes.pop(0)
                held = decide(wf, state, note)
                if held.ignored is None and held.state is not None:
                    state = held.state
                    at_seq[state.seq].append(state)
    if divergence is None and snap.state is not None:
        seen = at_seq.get(snap.state.seq)
        recorded = snap.state
        mine = None if not seen else next((m for m in seen if not state_diff(recorded, m)), seen[-1])
        if mine is None:
            divergence = Divergence(
                len(groups),
                "the recorded state",
                None,
                [],
                [],
                f"the recorded state is at seq {snap.state.seq}, which no decision reached",
            )
        else:
            diff = state_diff(snap.state, mine)
            if diff:
                divergence = Divergence(
                    len(groups),
                    "the recorded state",
                    None,
                    [],
                    [],
                    "final state differs: " + "; ".join(diff[:5]),
                )
    final = state.status if state is not None else None
    return RecordedReplay(
        run_id=snap.run_id,
        workflow=wf.name,
        recorded_version=snap.version,
        replay_version=wf.version,
        decisions=len(groups),
        events=len(events),
        verdict="converged" if divergence is None else "diverged",
        original_status=snap.state.status if snap.state is not None else None,
        replay_status=final if divergence is None else None,
        original_path=path_of(events),
        replay_path=path_of(replayed),
        divergence=divergence,
    )


@dataclass
class BatchRecorded:
    """Recorded replay of many runs: counts and the diverged runs."""

    runs: int = 0
    converged: int = 0
    diverged: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    divergent: list[RecordedReplay] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.elapsed_s if self.elapsed_s > 0 else 0.0


def replay_recorded_many(
    definitions: Sequence[WorkflowDef],
    snapshots: Sequence[Snapshot],
    *,
    version: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> BatchRecorded:
    """Recorded replay of every snapshot; a run whose replay cannot start is counted under ``errors``."""
    import time

    now = clock or time.perf_counter
    t0 = now()
    out = BatchRecorded()
    for i, snap in enumerate(snapshots):
        out.runs += 1
        try:
            r = replay_given(definitions, snap, version)
        except ReplayError as exc:
            out.errors += 1
            out.failed[snap.run_id] = str(exc)
        else:
            if r.verdict == "converged":
                out.converged += 1
            else:
                out.diverged += 1
                out.divergent.append(r)
        if on_progress is not None:
            on_progress(i + 1)
    out.elapsed_s = now() - t0
    return out


def path_of(events: Sequence[RunEvent]) -> list[str]:
    """The run's path: steps in the order they were first scheduled, then ``end:<outcome>`` or the status."""
    steps: list[str] = []
    end: list[str] = []
    for e in events:
        if e.type in ("step.scheduled", "step.waiting") and e.step and e.step not in steps:
            steps.append(e.step)
        elif e.type == "run.completed":
            end = [f"end:{e.data.get('outcome')}"]
        elif e.type in ("run.quarantined", "run.over_budget", "run.refused", "run.cancelled", "run.rejected"):
            end = [e.type.split(".", 1)[1]]
    return steps + end


def describe_input(inp: DeciderInput) -> str:
    name = type(inp).__name__
    if isinstance(inp, StepResult):
        what = "ok" if inp.ok else f"{inp.error_type}"
        return f"{name} {inp.kind} {inp.step!r} attempt {inp.attempt} ({what}) at {inp.at_ms}"
    if isinstance(inp, Answer):
        return f"{name} {'approve' if inp.approved else 'reject'} {inp.step!r} by {inp.by!r} at {inp.at_ms}"
    if isinstance(inp, SignalReceived):
        return f"{name} {inp.name!r} at {inp.at_ms}"
    return f"{name} at {inp.at_ms}"


def state_diff(a: RunState, b: RunState) -> list[str]:
    """Dotted paths where two states differ (the definition version is not compared)."""
    out: list[str] = []
    _diff(
        a.model_dump(mode="json", exclude=_NOT_COMPARED),
        b.model_dump(mode="json", exclude=_NOT_COMPARED),
        "",
        out,
    )
    return out


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k), b.get(k), f"{where}.{k}" if where else str(k), out)
    elif a != b:
        out.append(f"{where}: {a!r} -> {b!r}")


def _decisions(events: Sequence[RunEvent]) -> list[list[RunEvent]]:
    groups: list[list[RunEvent]] = []
    for e in events:
        if e.type in INPUT_TYPES or not groups:
            groups.append([e])
        else:
            groups[-1].append(e)
    return groups


def _norm(e: RunEvent) -> dict[str, Any]:
    out = e.model_dump(mode="json", exclude=_NOT_COMPARED)
    for key in _PIN_DATA.get(e.type, ()):
        out["data"].pop(key, None)
    return out


def _why(want: list[dict[str, Any]], got: list[dict[str, Any]], j: int) -> str:
    if j >= len(got):
        w = want[j]
        return f"the record has {w['type']} {w.get('step') or ''} (seq {w['seq']}), the replay does not"
    if j >= len(want):
        g = got[j]
        return f"the replay adds {g['type']} {g.get('step') or ''} (seq {g['seq']})"
    w, g = want[j], got[j]
    if (w["type"], w.get("step")) != (g["type"], g.get("step")):
        return (
            f"seq {w['seq']}: recorded {w['type']} {w.get('step') or ''}, "
            f"replay {g['type']} {g.get('step') or ''}"
        ).replace("  ", " ")
    keys = [k for k in sorted(set(w) | set(g)) if w.get(k) != g.get(k)]
    detail = []
    for k in keys:
        if isinstance(w.get(k), dict) and isinstance(g.get(k), dict):
            sub = [x for x in sorted(set(w[k]) | set(g[k])) if w[k].get(x) != g[k].get(x)]
            detail += [f"{k}.{x}: {w[k].get(x)!r} -> {g[k].get(x)!r}" for x in sub]
        else:
            detail.append(f"{k}: {w.get(k)!r} -> {g.get(k)!r}")
    return f"seq {w['seq']} {w['type']} {w.get('step') or ''}: " + "; ".join(detail)

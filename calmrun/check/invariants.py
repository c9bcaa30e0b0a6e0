"""The history checker: does every run have exactly one history, and does its state follow from it?

Reads the events, state and dead-letter topics of one prefix end to end (``read_committed``, as every
calmrun reader does) and checks each run against the invariants of effectively-once execution:

- each seq names one event (two different events under one seq is a forked history), seqs run 1..N;
- at most one terminal event (``run.completed``, ``run.refused``, ``run.cancelled``), nothing after it;
  a refused request's ``run.rejected`` is a note (seq -1, ``workflow.rejection``): a run ID whose only
  record is a rejection has no history, and its state (status ``rejected``) must be at seq 0;
  quarantines and redrives alternate; at most one cancel, and ``run.cancelled`` only after it;
- an approval step has at most one answer per wait (``step.approved``/``step.rejected``);
- no step attempt has two results, no step is routed twice;
- a new attempt of a step follows a result (or a cancellation) of the attempt before it: an attempt
  number is never spent on a task that was lost, queued or moved;
- the last state record is at the last event's seq and, given the definitions, equals the fold of the
  events through the decider (recorded replay converges);
- every ``run.quarantined`` has one dead-letter record, and no quarantine record lacks one.

``check_history`` is the library entry point (the fault tests end with it); ``calmrun check history`` prints
its report and exits non-zero on any violation.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.errors import CalmrunError, ErrorKind
from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics, start_client
from calmrun.replay.recorded import replay_given
from calmrun.replay.snapshot import Snapshot
from calmrun.settings import KafkaSettings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import HELD_NOTES, RunEvent
from calmrun.workflow.state import RunState

TERMINAL = frozenset({"run.completed", "run.refused", "run.cancelled"})
RESULTS = frozenset({"step.succeeded", "step.failed"})
SCHEDULED = frozenset({"step.scheduled", "step.compensation_scheduled"})
ANSWERS = frozenset({"step.approved", "step.rejected"})


class Rule(enum.StrEnum):
    """What a violation broke."""

    SEQ_CONFLICT = "seq-conflict"  # two different events under one seq: the history forked
    SEQ_GAP = "seq-gap"  # a seq is missing: an event was lost
    TERMINAL = "terminal"  # two terminal events, or events after one
    RESULT_TWICE = "result-twice"  # one step attempt has two results, or a step was routed twice
    ATTEMPT_UNEXPLAINED = "attempt-unexplained"  # a new attempt without a result of the one before
    STATE = "state"  # the last state is not at the last event, or not the fold of the events
    DEAD_LETTER = "dead-letter"  # quarantines and their dead-letter records do not match


@dataclass(frozen=True)
class Violation:
    """One broken invariant of one run, with the events that show it."""

    run_id: str
    rule: Rule
    detail: str
    events: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "rule": str(self.rule),
            "detail": self.detail,
            "events": list(self.events),
        }


@dataclass
class HistoryReport:
    """What the checker read and what it found."""

    runs: int = 0
    events: int = 0
    copies: int = 0  # identical copies of an event (same seq, same content): harmless, counted
    states: int = 0
    dead_letters: int = 0
    replayed: int = 0  # runs re-decided against their definition
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_rule(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for v in self.violations:
            counts[str(v.rule)] += 1
        return dict(counts)

    def bad_runs(self) -> set[str]:
        return {v.run_id for v in self.violations}

    def summary(self) -> str:
        head = (
            f"{self.runs} runs, {self.events} events ({self.copies} identical copies), {self.states} states, "
            f"{self.dead_letters} dead letters, {self.replayed} re-decided"
        )
        if self.ok:
            return f"history ok: {head}"
        rules = ", ".join(f"{k} {n}" for k, n in sorted(self.by_rule().items()))
        broken = f"{len(self.bad_runs())} runs, {len(self.violations)} violations"
        return f"history BROKEN: {broken} ({rules}); {head}"

    def to_dict(self, limit: int = 50) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": self.runs,
            "events": self.events,
            "copies": self.copies,
            "states": self.states,
            "dead_letters": self.dead_letters,
            "replayed": self.replayed,
            "by_rule": self.by_rule(),
            "violations": [v.to_dict() for v in self.violations[:limit]],
        }


def _show(e: RunEvent) -> str:
    where = f" {e.step}#{e.attempt}" if e.step is not None else ""
    return f"seq {e.seq} {e.type}{where}"


def check_run(
    run_id: str,
    events: Sequence[RunEvent],
    state: RunState | None,
    quarantine_letters: int,
    definitions: Sequence[WorkflowDef] = (),
) -> tuple[list[Violation], int, bool]:
    """Check one run; returns its violations, the identical copies seen, and whether it was re-decided."""
    out: list[Violation] = []

    def bad(rule: Rule, detail: str, evs: Iterable[RunEvent] = ()) -> None:
        out.append(Violation(run_id, rule, detail, tuple(_show(e) for e in evs)))

    by_seq: dict[int, RunEvent] = {}
    copies = 0
    for e in events:
        if e.seq < 0:
            continue
        first = by_seq.get(e.seq)
        if first is None:
            by_seq[e.seq] = e
        elif first == e:
            copies += 1
        else:
            bad(Rule.SEQ_CONFLICT, f"seq {e.seq} names two different events", (first, e))
    history = [by_seq[s] for s in sorted(by_seq)]
    if history and [e.seq for e in history] != list(range(1, len(history) + 1)):
        missing = sorted(set(range(1, history[-1].seq + 1)) - set(by_seq))
        bad(Rule.SEQ_GAP, f"seqs missing: {missing[:10]}")

    terminal = [e for e in history if e.type in TERMINAL]
    if len(terminal) > 1:
        bad(Rule.TERMINAL, f"{len(terminal)} terminal events", terminal)
    if terminal and history[-1].seq > terminal[0].seq:
        bad(Rule.TERMINAL, "events after the terminal event", [terminal[0], history[-1]])
    quarantines = redrives = 0
    for e in history:
        if e.type == "run.quarantined":
            quarantines += 1
            if quarantines > redrives + 1:
                bad(Rule.TERMINAL, "quarantined twice without a redrive between", [e])
        elif e.type == "run.redrive_requested":
            redrives += 1
    cancels = [e for e in history if e.type == "run.cancel_requested"]
    if len(cancels) > 1:
        bad(Rule.TERMINAL, f"{len(cancels)} cancels applied", cancels)
    for e in history:
        if e.type == "run.cancelled" and not (cancels and cancels[0].seq < e.seq):
            bad(Rule.TERMINAL, "run.cancelled without a cancel before it", [e])

    results: dict[tuple[str, str, int], RunEvent] = {}
    routed: dict[tuple[str, int], RunEvent] = {}  # (step, loop iteration)
    ended: set[tuple[str, int]] = set()  # (step, attempt) with a result or a cancellation
    for e in history:
        step, attempt = e.step or "", e.attempt or 0
        if (
            e.data.get("element") is not None and e.type != "run.routed"
        ):  # a map's element: attempts of its own
            step = f"{step}[{e.data['element']}]"
        if e.type == "step.failed" and e.data.get("error_type") == ErrorKind.TOOL_APPROVAL_PENDING:
            continue  # a pause on a tool call, not the attempt's result: the answer re-issues the attempt
        if e.type in RESULTS:
            k = (step, str(e.data.get("kind", "run")), attempt)
            if k in results:
                bad(Rule.RESULT_TWICE, f"two results for {step} attempt {attempt}", (results[k], e))
            results[k] = e
            ended.add((step, attempt))
        elif e.type in ANSWERS:
            # an agent step's tool calls: one answer per call (an attempt may pause on several)
            calls = e.data.get("tool_call_ids")
            k = (step, "answer" if calls is None else f"answer {sorted(calls)}", attempt)
            if k in results:
                bad(Rule.RESULT_TWICE, f"two answers for {step} wait {attempt}", (results[k], e))
            results[k] = e
        elif e.type == "step.cancelled":
            ended.add((step, attempt))
        elif e.type == "run.routed":
            visit = (step, int(e.data.get("iteration", 0)))
            if visit in routed:
                again = f" in iteration {visit[1]}" if visit[1] else ""
                bad(Rule.RESULT_TWICE, f"step {step} routed twice{again}", (routed[visit], e))
            routed[visit] = e
        elif e.type in SCHEDULED and attempt > 1 and (step, attempt - 1) not in ended:
            bad(
                Rule.ATTEMPT_UNEXPLAINED,
                f"attempt {attempt} of {step} without a result of attempt {attempt - 1}",
                [e],
            )

    if quarantine_letters != quarantines:
        bad(Rule.DEAD_LETTER, f"{quarantines} quarantines but {quarantine_letters} dead-letter records")

    if state is None:
        if history:
            bad(Rule.STATE, "events but no state record", history[-1:])
        return out, copies, False
    last = history[-1].seq if history else 0
    if state.seq != last:
        bad(Rule.STATE, f"the state is at seq {state.seq} but the events end at seq {last}", history[-1:])
        return out, copies, False
    if not definitions or not history:
        return out, copies, False
    try:
        # the definition the run started on, then each recorded migration's target
        notes = [e for e in events if e.seq < 0 and e.type in HELD_NOTES]  # held commands change the state
        snap = Snapshot(run_id=run_id, state=state, events=history, notes=notes)
        verdict = replay_given(definitions, snap)
    except CalmrunError as exc:
        bad(Rule.STATE, f"cannot re-decide: {exc}")
        return out, copies, False
    if verdict.divergence is not None:
        d = verdict.divergence
        bad(Rule.STATE, f"the events do not fold to the state: decision {d.decision}: {d.reason}")
    return out, copies, True


async def check_history(
    kafka: KafkaSettings, definitions: Sequence[WorkflowDef] = (), *, run_ids: Iterable[str] | None = None
) -> HistoryReport:
    """Read one prefix's events, states and dead letters and check every run (or ``run_ids``).

    Raises:
        BrokerUnavailableError: no broker answers.
    """
    topics = Topics(kafka.prefix)
    codec = RecordCodec(wire_models())
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        client_id=f"{kafka.client_id}-check",
        **client_kwargs(kafka),
    )
    await start_client(consumer, kafka)
    report = HistoryReport()
    events: dict[str, list[RunEvent]] = defaultdict(list)
    states: dict[str, RunState] = {}
    letters: dict[str, int] = defaultdict(int)
    try:
        names = await consumer.topics()
        dlqs = sorted(t for t in names if t.startswith(f"{kafka.prefix}.dlq."))

        def tps(topic: str) -> list[TopicPartition]:
            return [TopicPartition(topic, p) for p in range(kafka.partitions)] if topic in names else []

        async for rec in read_to_end(consumer, tps(topics.events)):
            if rec.value is not None:
                ev = codec.decode_as(rec.value, RunEvent)
                events[ev.run_id].append(ev)
                report.events += 1
        async for rec in read_to_end(consumer, tps(topics.state)):
            run_id = (rec.key or b"").decode(errors="replace")
            if rec.value is None:
                states.pop(run_id, None)
            else:
                states[run_id] = codec.decode_as(rec.value, RunState)
        for topic in dlqs:
            async for rec in read_to_end(consumer, tps(topic)):
                if rec.value is None:
                    continue
                report.dead_letters += 1
                letter = codec.decode_as(rec.value, DlqRecord)
                if letter.reason == "quarantined" and letter.run_id is not None:
                    letters[letter.run_id] += 1
    finally:
        await consumer.stop()
    wanted = set(run_ids) if run_ids is not None else set(events) | set(states) | set(letters)
    report.runs = len(wanted)
    report.states = sum(1 for r in wanted if r in states)
    for run_id in sorted(wanted):
        violations, copies, replayed = check_run(
            run_id, events.get(run_id, []), states.get(run_id), letters.get(run_id, 0), definitions
        )
        report.violations.extend(violations)
        report.copies += copies
        report.replayed += replayed
    return report

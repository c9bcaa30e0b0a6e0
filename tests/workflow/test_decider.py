"""Scenario tests of the pure decider: one run driven input by input, no Kafka."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import pytest

from calmrun.errors import InputMappingError
from calmrun.replay.recorded import replay_recorded
from calmrun.replay.snapshot import Snapshot
from calmrun.workflow.decider import (
    Decision,
    Quarantine,
    backoff_ms,
    decide,
    resolve_input,
)
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import (
    HISTORY,
    DeciderInput,
    RedriveRequested,
    RunRequested,
    StepCost,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.history import fold, inputs_from_events
from calmrun.workflow.state import RunState

RUN = "run-1"
Kind = Literal["run", "compensate"]


def workflow(steps: list[dict[str, Any]], **extra: Any) -> WorkflowDef:
    return parse_workflow({"name": "wf", "steps": steps, **extra}, source="test")


class Run:
    """Drives one run through the decider and checks the invariants of every decision.

    Every call checks: the input state is never mutated; an ignored input returns the very same state and
    logs exactly one ``input.ignored`` record with seq -1; otherwise seq rises by exactly 1 per event.
    """

    def __init__(self, wf: WorkflowDef, run_id: str = RUN) -> None:
        self.wf, self.run_id = wf, run_id
        self.state: RunState | None = None
        self.decisions: list[Decision] = []

    def feed(self, event: DeciderInput) -> Decision:
        before = self.state.model_dump() if self.state is not None else None
        prev_seq = self.state.seq if self.state is not None else 0
        d = decide(self.wf, self.state, event)
        if self.state is not None:
            assert self.state.model_dump() == before, "decide() mutated the state it was given"
        if d.ignored is not None:
            assert d.state is self.state
            assert d.tasks == () and d.quarantine is None
            if self.state is not None:
                assert [(e.type, e.seq) for e in d.events] == [("input.ignored", -1)]
                assert d.events[0].data["reason"] == d.ignored
        else:
            assert d.state is not None and d.state is not self.state
            assert d.events, "an applied input always logs at least itself"
            assert [e.seq for e in d.events] == list(range(prev_seq + 1, prev_seq + 1 + len(d.events)))
            assert d.state.seq == d.events[-1].seq
            assert all(e.run_id == self.run_id for e in d.events)
        self.decisions.append(d)
        self.state = d.state
        return d

    # shorthands
    def request(
        self,
        at: int = 0,
        input: dict[str, Any] | None = None,
        tenant: str = "default",
        history: int = HISTORY,
    ) -> Decision:
        return self.feed(
            RunRequested(self.run_id, self.wf.name, dict(input or {}), at, tenant, history=history)
        )

    def ok(self, step: str, attempt: int = 1, at: int = 0, kind: Kind = "run", **output: Any) -> Decision:
        return self.feed(StepResult(self.run_id, step, attempt, at, kind=kind, output=output))

    def fail(
        self,
        step: str,
        attempt: int = 1,
        at: int = 0,
        kind: Kind = "run",
        retriable: bool = True,
        error_type: str = "Boom",
        error: str = "it broke",
    ) -> Decision:
        return self.feed(
            StepResult(
                self.run_id,
                step,
                attempt,
                at,
                kind=kind,
                error_type=error_type,
                error=error,
                retriable=retriable,
            )
        )

    def timer(self, at: int) -> Decision:
        return self.feed(TimerFired(self.run_id, at))

    def redrive(self, at: int) -> Decision:
        return self.feed(RedriveRequested(self.run_id, at))

    @property
    def s(self) -> RunState:
        assert self.state is not None
        return self.state


def types(d: Decision) -> list[str]:
    return [e.type for e in d.events]


def typed_steps(d: Decision) -> list[tuple[str, str | None]]:
    return [(e.type, e.step) for e in d.events]


def task_ids(d: Decision) -> list[tuple[str, int, str]]:
    return [(t.step, t.attempt, t.kind) for t in d.tasks]


# -- linear happy path -----------------------------------------------------------------------------

LINEAR = workflow(
    [
        {"name": "fetch", "agent": "fetcher", "model": "fast", "timeout_s": 10, "next": "extract"},
        {"name": "extract", "agent": "extractor", "next": "store"},
        {"name": "store", "agent": "storer"},
    ],
    deadline_grace_s=5,
)


def test_linear_happy_path() -> None:
    run = Run(LINEAR)
    d = run.request(at=1000, input={"url": "u"}, tenant="acme")
    assert types(d) == ["run.requested", "step.scheduled"]
    # the run is pinned to the definition it started on: its version and content hash are recorded
    assert d.events[0].data == {"input": {"url": "u"}, "version": "1", "digest": LINEAR.digest, "history": 2}
    assert d.state is not None and (d.state.version, d.state.digest) == ("1", LINEAR.digest)
    assert d.tasks == (
        StepTask(
            run_id=RUN,
            workflow="wf",
            version="1",
            step="fetch",
            attempt=1,
            kind="run",
            agent="fetcher",
            model="fast",
            input={"url": "u"},
            tenant="acme",
            issued_ms=1000,
            timeout_s=10,
        ),
    )
    assert run.s.steps["fetch"].deadline_ms == 1000 + 15_000
    assert run.s.status == "running" and not run.s.is_terminal()

    d = run.ok("fetch", at=2000, page="p")
    assert types(d) == ["step.succeeded", "step.scheduled"]  # no branches: the definition routes it
    assert task_ids(d) == [("extract", 1, "run")]
    assert d.tasks[0].agent == "extractor" and d.tasks[0].input == {"url": "u"}

    d = run.ok("extract", at=3000, fields=[1, 2])
    assert task_ids(d) == [("store", 1, "run")]

    d = run.ok("store", at=4000)
    assert types(d) == ["step.succeeded", "run.completed"]
    assert d.events[-1].data == {
        "outcome": "completed",
        "outputs": {"fetch": {"page": "p"}, "extract": {"fields": [1, 2]}, "store": {}},
    }
    assert d.tasks == ()
    s = run.s
    assert (s.status, s.outcome, s.tenant, s.clock_ms, s.created_ms) == (
        "completed",
        "completed",
        "acme",
        4000,
        1000,
    )
    assert s.is_terminal() and s.next_due_ms() is None
    assert {n: (st.status, st.attempt) for n, st in s.steps.items()} == {
        "fetch": ("succeeded", 1),
        "extract": ("succeeded", 1),
        "store": ("succeeded", 1),
    }
    assert s.seq == 2 + 2 + 2 + 2
    all_events = [e for dec in run.decisions for e in dec.events]
    assert [e.seq for e in all_events] == list(range(1, s.seq + 1))
    assert [e.type for e in all_events] == [
        "run.requested",
        "step.scheduled",
        "step.succeeded",
        "step.scheduled",
        "step.succeeded",
        "step.scheduled",
        "step.succeeded",
        "run.completed",
    ]
    assert all_events[0].data["history"] == HISTORY == s.history == 2
    # the audit record of a result carries its cost
    assert all_events[2].cost == StepCost()


def test_a_run_of_history_1_records_every_route_and_replays_as_recorded() -> None:
    """A run begun before history 2 (its state says 1) goes on recording ``run.routed`` after every step,
    and its recorded inputs re-decide to the same events: they rebuild the request with history 1."""
    run = Run(LINEAR)
    d = run.request(history=1)
    assert "history" not in d.events[0].data and run.s.history == 1
    d = run.ok("fetch", page="p")
    assert types(d) == ["step.succeeded", "run.routed", "step.scheduled"]
    assert d.events[1].data == {"to": ["extract"], "by": "next"}
    run.ok("extract")
    d = run.ok("store")
    assert types(d) == ["step.succeeded", "run.routed", "run.completed"]
    assert d.events[1].data == {"to": ["end:completed"], "by": "next"}
    recorded = [e for dec in run.decisions for e in dec.events]
    state, events = fold(LINEAR, inputs_from_events(recorded))
    assert events == recorded and state == run.s
    snap = Snapshot(run_id=RUN, state=run.s, events=recorded)
    assert replay_recorded(LINEAR, snap).verdict == "converged"
    # a state restored from a topic written before the field existed decodes as history 1
    assert RunState(run_id="r", workflow="w", version="1").history == 1


def test_events_carry_run_identity_and_clock() -> None:
    run = Run(LINEAR)
    run.request(at=5, tenant="t1")
    d = run.ok("fetch", at=3)  # an older timestamp never moves the clock back
    assert all(e.at_ms == 5 for e in d.events)
    assert all((e.workflow, e.version, e.tenant) == ("wf", "1", "t1") for e in d.events)
    assert d.events[0].step == "fetch" and d.events[0].attempt == 1
    assert run.s.steps["fetch"].finished_ms == 5


def test_step_task_idempotency_key() -> None:
    run = Run(LINEAR)
    task = run.request().tasks[0]
    assert task.idempotency_key == f"{RUN}/fetch/run/1"
    assert (
        task.model_copy(update={"kind": "compensate", "attempt": 3}).idempotency_key
        == f"{RUN}/fetch/compensate/3"
    )


def test_start_at_end_completes_at_once() -> None:
    wf = workflow([{"name": "a", "agent": "x"}], start="end:skipped", outcomes=["skipped"])
    d = Run(wf).request(at=7)
    assert types(d) == ["run.requested", "run.completed"]
    assert d.state is not None and (d.state.status, d.state.outcome) == ("completed", "skipped")


# -- branches --------------------------------------------------------------------------------------

BRANCHY = workflow(
    [
        {
            "name": "score",
            "agent": "scorer",
            "branches": [
                {"when": {"field": "score", "op": "ge", "value": 0.8}, "goto": "approve"},
                {"when": {"field": "score", "op": "ge", "value": 0.5}, "goto": "review"},
                {"when": {"field": "flag", "op": "exists"}, "goto": "end:flagged"},
            ],
            "next": "reject",
        },
        {"name": "approve", "agent": "a", "next": "end:approved"},
        {"name": "review", "agent": "r"},
        {"name": "reject", "agent": "j", "next": "end:rejected"},
    ],
    outcomes=["approved", "rejected", "flagged"],
)


@pytest.mark.parametrize(
    ("output", "by", "to"),
    [
        ({"score": 0.9}, "branches[0]", ["approve"]),  # matches 0 and 1: the first wins
        ({"score": 0.8, "flag": 1}, "branches[0]", ["approve"]),
        ({"score": 0.6}, "branches[1]", ["review"]),
        ({"score": 0.1, "flag": True}, "branches[2]", ["end:flagged"]),
        ({"score": 0.1}, "next", ["reject"]),
        ({}, "next", ["reject"]),
        ({"score": "high"}, "next", ["reject"]),  # type mismatch never matches
    ],
)
def test_branches_in_order_first_match_wins(output: dict[str, Any], by: str, to: list[str]) -> None:
    run = Run(BRANCHY)
    run.request()
    d = run.ok("score", **output)
    routed = next(e for e in d.events if e.type == "run.routed")
    assert routed.step == "score"
    assert routed.data == {"to": to, "by": by}
    started = [t.step for t in d.tasks]
    assert started == [t for t in to if not t.startswith("end:")]


@pytest.mark.parametrize(
    ("output", "path", "outcome"),
    [
        ({"score": 0.9}, ["approve"], "approved"),
        ({"score": 0.6}, ["review"], "completed"),
        ({"score": 0.0}, ["reject"], "rejected"),
        ({"flag": 1}, [], "flagged"),
    ],
)
def test_branch_outcomes(output: dict[str, Any], path: list[str], outcome: str) -> None:
    run = Run(BRANCHY)
    run.request()
    d = run.ok("score", at=1, **output)
    for step in path:
        assert [t.step for t in d.tasks] == [step]
        d = run.ok(step, at=2)
    assert types(d)[-1] == "run.completed"
    assert (run.s.status, run.s.outcome) == ("completed", outcome)
    assert set(run.s.steps) == {"score", *path}
    # a run that reached end:<outcome> is terminal and ignores anything further
    assert run.ok("score", at=3).ignored is not None


# -- parallel fan-out and join ---------------------------------------------------------------------

FAN = workflow(
    [
        {"name": "split", "agent": "s", "next": ["left", "right"]},
        {"name": "left", "agent": "l", "next": "join"},
        {"name": "right", "agent": "r", "next": "join"},
        {
            "name": "join",
            "agent": "j",
            "needs": ["left", "right"],
            "input": {"l": "steps.left.v", "r": "steps.right.v"},
        },
    ]
)


@pytest.mark.parametrize("order", [("left", "right"), ("right", "left")])
def test_fan_out_and_join(order: tuple[str, str]) -> None:
    run = Run(FAN)
    run.request()
    d = run.ok("split", at=10)
    assert task_ids(d) == [("left", 1, "run"), ("right", 1, "run")]
    assert types(d) == ["step.succeeded", "step.scheduled", "step.scheduled"]

    first, second = order
    d = run.ok(first, at=20, v=first)
    assert types(d) == ["step.succeeded"]
    assert d.tasks == () and "join" not in run.s.steps
    assert run.s.status == "running"

    d = run.ok(second, at=30, v=second)
    assert types(d) == ["step.succeeded", "step.scheduled"]
    assert task_ids(d) == [("join", 1, "run")]
    assert d.tasks[0].input == {"l": "left", "r": "right"}

    # the join is started once: a redelivered branch result does not start it again
    assert run.ok(first, at=40, v=first).ignored is not None
    d = run.ok("join", at=50)
    assert types(d)[-1] == "run.completed"
    assert run.s.steps["join"].attempt == 1


def test_parallel_end_outcome_waits_for_other_branch() -> None:
    wf = workflow(
        [
            {"name": "a", "agent": "x", "next": ["b", "c"]},
            {"name": "b", "agent": "x", "next": "end:early"},
            {"name": "c", "agent": "x"},
        ],
        outcomes=["early"],
    )
    run = Run(wf)
    run.request()
    run.ok("a")
    d = run.ok("b")
    assert "run.completed" not in types(d)
    assert run.s.outcome == "early" and run.s.status == "running"
    d = run.ok("c")
    assert types(d)[-1] == "run.completed"
    assert (run.s.status, run.s.outcome) == ("completed", "early")  # the first outcome reached wins


def test_join_waiting_for_branch_not_taken_is_stuck() -> None:
    wf = workflow(
        [
            {
                "name": "a",
                "agent": "x",
                "branches": [{"when": {"field": "go", "value": "b"}, "goto": "b"}],
                "next": "c",
            },
            {"name": "b", "agent": "x", "next": "d"},
            {"name": "c", "agent": "x", "next": "d"},
            {"name": "d", "agent": "x", "needs": ["b", "c"]},
        ]
    )
    run = Run(wf)
    run.request()
    run.ok("a", go="b")
    d = run.ok("b")
    assert types(d) == ["step.succeeded", "run.quarantined"]
    assert d.quarantine is not None
    assert (d.quarantine.step, d.quarantine.attempt, d.quarantine.error_type) == (None, 0, "StuckRun")
    assert (run.s.status, run.s.error_type) == ("quarantined", "StuckRun")
    assert "d" not in run.s.steps
    assert run.s.is_terminal()


# -- retries and backoff ---------------------------------------------------------------------------

RETRY = workflow(
    [
        {
            "name": "call",
            "agent": "caller",
            "timeout_s": 1,
            "retry": {
                "max_attempts": 4,
                "initial_backoff_s": 1,
                "multiplier": 2,
                "max_backoff_s": 3,
                "jitter": 0.25,
            },
            "next": "after",
        },
        {"name": "after", "agent": "x"},
    ],
    deadline_grace_s=1,
)


@pytest.mark.parametrize(
    ("attempt", "retry_base", "base_ms"),
    [
        (1, 0, 1000),
        (2, 0, 2000),
        (3, 0, 3000),
        (4, 0, 3000),
        (10, 0, 3000),
        (4, 3, 1000),
        (5, 3, 2000),
        (3, 5, 1000),
    ],
)
def test_backoff_exponential_capped_with_bounded_jitter(attempt: int, retry_base: int, base_ms: int) -> None:
    delay = backoff_ms(RETRY, RUN, "call", attempt, retry_base)
    assert base_ms * 0.75 <= delay <= base_ms * 1.25
    assert delay == backoff_ms(RETRY, RUN, "call", attempt, retry_base)  # deterministic
    no_jitter = workflow(
        [
            {
                "name": "call",
                "agent": "c",
                "retry": {"initial_backoff_s": 1, "multiplier": 2, "max_backoff_s": 3, "jitter": 0},
            }
        ]
    )
    assert backoff_ms(no_jitter, RUN, "call", attempt, retry_base) == base_ms


def test_backoff_jitter_is_hashed_from_identity() -> None:
    delays = {backoff_ms(RETRY, f"run-{i}", "call", 1, 0) for i in range(50)}
    assert len(delays) > 10  # spread out ...
    assert all(750 <= d <= 1250 for d in delays)  # ... within +/- jitter
    # the identity is (run, step, attempt): another attempt or run gives another jitter
    assert backoff_ms(RETRY, "a", "call", 1, 0) == backoff_ms(RETRY, "a", "call", 1, 0)


def test_retry_with_backoff_then_success() -> None:
    run = Run(RETRY)
    run.request(at=0)
    d = run.fail("call", attempt=1, at=1000, error_type="RateLimited")
    assert types(d) == ["step.failed", "step.retry_scheduled"]
    delay = backoff_ms(RETRY, RUN, "call", 1, 0)
    assert d.events[1].data == {"due_ms": 1000 + delay, "delay_ms": delay, "error_type": "RateLimited"}
    st = run.s.steps["call"]
    assert (st.status, st.attempt, st.due_ms, st.deadline_ms) == ("retry_wait", 1, 1000 + delay, None)
    assert (st.error_type, st.error) == ("RateLimited", "it broke")
    assert run.s.next_due_ms() == 1000 + delay
    assert d.tasks == ()

    # the timer fires only when due
    assert run.timer(1000 + delay - 1).ignored == "nothing is due"
    d = run.timer(1000 + delay)
    assert types(d) == ["timer.fired", "step.scheduled"]
    assert d.events[0].data == {"due": ["call"], "at_ms": 2080}
    assert task_ids(d) == [("call", 2, "run")]
    assert d.tasks[0].issued_ms == 1000 + delay
    st = run.s.steps["call"]
    assert (st.status, st.attempt, st.due_ms, st.deadline_ms) == ("scheduled", 2, None, 1000 + delay + 2000)

    # a second failure waits about twice as long
    d = run.fail("call", attempt=2, at=5000)
    delay2 = backoff_ms(RETRY, RUN, "call", 2, 0)
    assert 1500 <= delay2 <= 2500
    assert run.s.steps["call"].due_ms == 5000 + delay2
    run.timer(5000 + delay2)
    d = run.ok("call", attempt=3, at=9000, x=1)
    assert task_ids(d) == [("after", 1, "run")]
    st = run.s.steps["call"]
    assert (st.status, st.attempt, st.error_type, st.error, st.output) == (
        "succeeded",
        3,
        None,
        None,
        {"x": 1},
    )


def test_retries_exhausted_quarantines() -> None:
    run = Run(RETRY)
    run.request(at=0)
    t = 0
    for attempt in range(1, 4):
        t += 10_000
        run.fail("call", attempt=attempt, at=t)
        t += 10_000
        assert task_ids(run.timer(t)) == [("call", attempt + 1, "run")]
    d = run.fail("call", attempt=4, at=t + 1, error_type="RateLimited", error="429")
    assert types(d) == ["step.failed", "run.quarantined"]
    assert d.quarantine == Quarantine("call", 4, "RateLimited", "429")
    assert (run.s.status, run.s.error_type, run.s.error) == ("quarantined", "RateLimited", "429")
    assert run.s.steps["call"].status == "failed"
    assert run.s.is_terminal()


def test_non_retriable_error_quarantines_at_once() -> None:
    run = Run(RETRY)
    run.request(at=0)
    d = run.fail("call", attempt=1, at=5, retriable=False, error_type="BadRequest", error="400")
    assert types(d) == ["step.failed", "run.quarantined"]
    assert d.events[0].data == {"kind": "run", "error_type": "BadRequest", "error": "400", "retriable": False}
    assert d.quarantine == Quarantine("call", 1, "BadRequest", "400")
    assert run.s.steps["call"].status == "failed"
    assert run.s.is_terminal() and d.tasks == ()


def test_timer_issues_every_due_step_in_name_order() -> None:
    wf = workflow(
        [
            {"name": "a", "agent": "x", "next": ["c", "b"]},
            {"name": "b", "agent": "x", "retry": {"initial_backoff_s": 1, "jitter": 0}},
            {"name": "c", "agent": "x", "retry": {"initial_backoff_s": 1, "jitter": 0}},
        ]
    )
    run = Run(wf)
    run.request()
    run.ok("a")
    run.fail("c", at=100)
    run.fail("b", at=200)
    assert run.s.next_due_ms() == 1100
    d = run.timer(1100)
    assert task_ids(d) == [("c", 2, "run")]
    d = run.timer(5000)
    assert task_ids(d) == [("b", 2, "run")]


# -- deadlines -------------------------------------------------------------------------------------


def test_deadline_expiry_reissues_the_same_attempt_and_takes_its_result() -> None:
    """A missing result is a lost task, not a failure: the same attempt (same key) is sent again."""
    run = Run(RETRY)  # timeout 1s + grace 1s
    run.request(at=0)
    assert run.s.steps["call"].deadline_ms == 2000
    assert run.s.next_due_ms() == 2000
    assert run.timer(1999).ignored is not None

    d = run.timer(2000)
    assert types(d) == ["timer.fired", "step.reissued"]
    assert d.events[1].attempt == 1
    assert d.events[1].data["expired_ms"] == 2000 and d.events[1].data["deadline_ms"] == 4000
    assert task_ids(d) == [("call", 1, "run")]
    assert d.tasks[0].idempotency_key == f"{RUN}/call/run/1"
    st = run.s.steps["call"]
    assert (st.status, st.attempt, st.deadline_ms, st.error_type) == ("scheduled", 1, 4000, None)

    # the result of attempt 1 (from either copy of the task) is taken once; a second copy is ignored
    run.ok("call", attempt=1, at=2100, x="first")
    assert run.s.steps["call"].output == {"x": "first"}
    assert run.ok("call", attempt=1, at=2200, x="second").ignored is not None
    assert run.s.steps["call"].output == {"x": "first"}


def test_deadline_expiry_never_costs_an_attempt() -> None:
    wf = workflow(
        [{"name": "a", "agent": "x", "timeout_s": 1, "retry": {"max_attempts": 1}}], deadline_grace_s=0
    )
    run = Run(wf)
    run.request(at=0)
    for at in (1000, 2000, 3000):
        d = run.timer(at)
        assert types(d) == ["timer.fired", "step.reissued"]
        assert task_ids(d) == [("a", 1, "run")]
    assert run.s.status == "running"
    assert run.s.steps["a"].attempt == 1
    run.fail("a", attempt=1, at=3500)  # a failure the attempt reports itself does count
    assert run.s.status == "quarantined"


# -- quarantine, cancellation and compensation -----------------------------------------------------

SAGA = workflow(
    [
        {
            "name": "reserve",
            "agent": "reserver",
            "compensate": "unreserve",
            "next": "log",
            "input": {"item": "input.item"},
        },
        {"name": "log", "agent": "logger", "next": "charge"},
        {"name": "charge", "agent": "charger", "compensate": "refund", "next": ["ship", "notify"]},
        {
            "name": "ship",
            "agent": "shipper",
            "retry": {"max_attempts": 2, "initial_backoff_s": 1, "jitter": 0},
        },
        {"name": "notify", "agent": "notifier", "compensate": "unnotify"},
    ]
)


def _saga_until_ship_fails() -> tuple[Run, Decision]:
    run = Run(SAGA)
    run.request(at=0, input={"item": "book"})
    run.ok("reserve", at=10, rid="r1")
    run.ok("log", at=20)
    run.ok("charge", at=30, cid="c1")
    run.fail("ship", attempt=1, at=40)
    run.timer(1040)
    d = run.fail("ship", attempt=2, at=1050, error_type="Unavailable", error="503")
    return run, d


def test_retries_exhausted_cancels_siblings_and_compensates_in_reverse() -> None:
    run, d = _saga_until_ship_fails()
    assert typed_steps(d) == [
        ("step.failed", "ship"),
        ("step.cancelled", "notify"),
        ("run.quarantined", "ship"),
        ("step.compensation_scheduled", "charge"),
    ]
    assert d.quarantine == Quarantine("ship", 2, "Unavailable", "503")
    assert d.events[1].data == {"reason": "run quarantined"}
    s = run.s
    assert s.status == "quarantined"
    assert s.compensations == ["charge", "reserve"]  # reverse completion order; 'log' has no compensate
    assert {n: st.status for n, st in s.steps.items()} == {
        "reserve": "succeeded",
        "log": "succeeded",
        "charge": "compensating",
        "ship": "failed",
        "notify": "cancelled",
    }
    # one compensation at a time, as a task of kind "compensate" for the compensating agent
    assert task_ids(d) == [("charge", 2, "compensate")]
    task = d.tasks[0]
    assert task.agent == "refund"
    assert task.idempotency_key == f"{RUN}/charge/compensate/2"
    assert not s.is_terminal()

    # the cancelled sibling's result is ignored
    assert run.ok("notify", at=1060).ignored is not None
    # a run-kind result for the compensating step is ignored too
    assert run.ok("charge", attempt=2, at=1061).ignored is not None

    d = run.ok("charge", attempt=2, at=1100, kind="compensate", refunded=True)
    assert typed_steps(d) == [
        ("step.succeeded", "charge"),
        ("step.compensated", "charge"),
        ("step.compensation_scheduled", "reserve"),
    ]
    assert d.events[0].data["kind"] == "compensate"
    assert task_ids(d) == [("reserve", 2, "compensate")]
    assert d.tasks[0].agent == "unreserve"
    assert d.tasks[0].input == {"item": "book"}  # the step's own input mapping
    assert run.s.steps["charge"].output == {"cid": "c1"}  # the compensation does not replace the output
    assert run.s.compensations == ["reserve"]

    d = run.ok("reserve", attempt=2, at=1200, kind="compensate")
    assert typed_steps(d) == [("step.succeeded", "reserve"), ("step.compensated", "reserve")]
    assert d.tasks == ()
    s = run.s
    assert s.compensations == [] and s.is_terminal() and s.status == "quarantined"
    assert {n for n, st in s.steps.items() if st.status == "compensated"} == {"charge", "reserve"}
    # a terminal run ignores every further result
    late: list[tuple[str, int, Kind]] = [
        ("reserve", 2, "compensate"),
        ("ship", 2, "run"),
        ("notify", 1, "run"),
    ]
    for step, attempt, kind in late:
        assert run.ok(step, attempt=attempt, at=2000, kind=kind).ignored is not None


def test_compensation_failure_retried_then_failed_and_next_continues() -> None:
    wf = workflow(
        [
            {"name": "a", "agent": "x", "compensate": "undo_a", "next": "b"},
            {
                "name": "b",
                "agent": "x",
                "compensate": "undo_b",
                "next": "c",
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.5, "jitter": 0},
            },
            {"name": "c", "agent": "x"},
        ]
    )
    run = Run(wf)
    run.request()
    run.ok("a", at=1)
    run.ok("b", at=2)
    d = run.fail("c", at=3, retriable=False)
    assert task_ids(d) == [("b", 2, "compensate")]
    assert run.s.steps["b"].retry_base == 1

    d = run.fail("b", attempt=2, at=10, kind="compensate")
    assert types(d) == ["step.failed", "step.retry_scheduled"]
    st = run.s.steps["b"]
    assert (st.status, st.due_ms, st.deadline_ms) == ("compensating", 510, None)
    assert run.fail("b", attempt=2, at=11, kind="compensate").ignored is not None  # duplicate
    d = run.timer(510)
    assert typed_steps(d) == [("timer.fired", None), ("step.compensation_scheduled", "b")]
    assert task_ids(d) == [("b", 3, "compensate")]
    assert d.tasks[0].agent == "undo_b"

    d = run.fail("b", attempt=3, at=600, kind="compensate", error_type="Gone", error="410")
    assert typed_steps(d) == [
        ("step.failed", "b"),
        ("step.compensation_failed", "b"),
        ("step.compensation_scheduled", "a"),
    ]
    assert d.events[1].data == {"error_type": "Gone", "error": "410"}
    assert run.s.steps["b"].status == "compensation_failed"
    assert task_ids(d) == [("a", 2, "compensate")]

    d = run.ok("a", attempt=2, at=700, kind="compensate")
    assert run.s.is_terminal()
    assert {n: st.status for n, st in run.s.steps.items()} == {
        "a": "compensated",
        "b": "compensation_failed",
        "c": "failed",
    }


def test_non_retriable_compensation_failure_fails_at_once() -> None:
    wf = workflow(
        [
            {"name": "a", "agent": "x", "compensate": "undo_a", "next": "b"},
            {"name": "b", "agent": "x"},
        ]
    )
    run = Run(wf)
    run.request()
    run.ok("a")
    run.fail("b", retriable=False)
    d = run.fail("a", attempt=2, kind="compensate", retriable=False)
    assert types(d) == ["step.failed", "step.compensation_failed"]
    assert run.s.is_terminal()


def test_compensation_deadline_expiry_reissues_the_compensation() -> None:
    wf = workflow(
        [
            {
                "name": "a",
                "agent": "x",
                "compensate": "undo_a",
                "timeout_s": 1,
                "next": "b",
                "retry": {"initial_backoff_s": 0, "jitter": 0},
            },
            {"name": "b", "agent": "x"},
        ],
        deadline_grace_s=0,
    )
    run = Run(wf)
    run.request(at=0)
    run.ok("a", at=0)
    run.fail("b", at=0, retriable=False)
    d = run.timer(1000)
    assert types(d) == ["timer.fired", "step.reissued"]
    assert d.events[1].data["kind"] == "compensate"
    assert task_ids(d) == [("a", 2, "compensate")]


# -- duplicates and unknown runs -------------------------------------------------------------------


def test_duplicate_run_request_is_ignored() -> None:
    run = Run(LINEAR)
    run.request(at=0, input={"a": 1})
    before = run.s.model_dump()
    d = run.request(at=50, input={"a": 2})
    assert d.ignored is not None and "duplicate run request" in d.ignored
    assert d.state is not None and d.state.model_dump() == before
    assert len(d.events) == 1
    ev = d.events[0]
    assert (ev.type, ev.seq, ev.run_id, ev.at_ms, ev.step) == ("input.ignored", -1, RUN, 50, None)
    assert ev.data["input"] == "RunRequested"


@pytest.mark.parametrize(
    "event",
    [
        StepResult(RUN, "fetch", 1, 0, output={}),
        TimerFired(RUN, 0),
        RedriveRequested(RUN, 0),
    ],
)
def test_input_for_unknown_run_is_ignored(event: DeciderInput) -> None:
    d = decide(LINEAR, None, event)
    assert d.state is None
    assert d.ignored is not None and RUN in d.ignored
    assert d.tasks == () and d.quarantine is None


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (StepResult(RUN, "extract", 1, 1, output={}), "not started"),
        (StepResult(RUN, "fetch", 2, 1, output={}), "scheduled at attempt 1"),
        (StepResult(RUN, "fetch", 1, 1, kind="compensate", output={}), "late or duplicate compensate result"),
    ],
)
def test_result_that_matches_no_attempt_is_ignored(result: StepResult, why: str) -> None:
    run = Run(LINEAR)
    run.request()
    d = run.feed(result)
    assert d.ignored is not None and why in d.ignored
    ev = d.events[0]
    assert (ev.step, ev.attempt, ev.data["kind"], ev.data["ok"]) == (
        result.step,
        result.attempt,
        result.kind,
        True,
    )


def test_duplicate_step_result_is_ignored() -> None:
    run = Run(LINEAR)
    run.request()
    run.ok("fetch", at=1, v=1)
    d = run.ok("fetch", at=2, v=2)
    assert d.ignored is not None and "succeeded at attempt 1" in d.ignored
    assert run.s.steps["fetch"].output == {"v": 1}  # the first result recorded wins
    d = run.fail("fetch", at=3)
    assert d.ignored is not None and d.events[0].data["ok"] is False


# -- redrive ---------------------------------------------------------------------------------------


def test_redrive_after_compensation_is_refused() -> None:
    run, _ = _saga_until_ship_fails()
    run.ok("charge", attempt=2, at=1100, kind="compensate")
    run.ok("reserve", attempt=2, at=1200, kind="compensate")
    assert run.s.is_terminal()

    d = run.redrive(at=5000)
    assert d.ignored is not None and "compensated" in d.ignored
    assert types(d) == ["input.ignored"]
    assert run.s.status == "quarantined"


def test_redrive_after_exhausted_retries_completes() -> None:
    run = Run(RETRY)
    run.request(at=0)
    run.fail("call", attempt=1, at=1, retriable=False)
    d = run.redrive(at=100)
    assert task_ids(d) == [("call", 2, "run")]
    assert run.s.steps["call"].retry_base == 1
    run.ok("call", attempt=2, at=200)
    d = run.ok("after", attempt=1, at=300)
    assert run.s.status == "completed"
    assert d.events[-1].type == "run.completed"


def test_redrive_of_running_or_completed_run_is_ignored() -> None:
    run = Run(LINEAR)
    run.request()
    d = run.redrive(at=1)
    assert d.ignored is not None and "this one is running" in d.ignored
    run.ok("fetch")
    run.ok("extract")
    run.ok("store")
    d = run.redrive(at=2)
    assert d.ignored is not None and "completed" in d.ignored


def test_redrive_while_compensating_is_ignored() -> None:
    run, _ = _saga_until_ship_fails()
    assert run.s.compensations
    d = run.redrive(at=2000)
    assert d.ignored is not None


# -- input mapping ---------------------------------------------------------------------------------

MAPPED = workflow(
    [
        {"name": "search", "agent": "s", "input": {"q": "input.query", "who": "run.tenant"}, "next": "read"},
        {
            "name": "read",
            "agent": "r",
            "next": "answer",
            "input": {
                "doc": "steps.search.hits.0.url",
                "run": "run.run_id",
                "wf": "run.workflow",
                "all": "input",
            },
        },
        {"name": "answer", "agent": "a", "input": {"missing": "steps.read.nothing"}},
    ]
)


def test_input_mapping() -> None:
    run = Run(MAPPED)
    d = run.request(input={"query": "kafka", "extra": 1}, tenant="acme")
    assert d.tasks[0].input == {"q": "kafka", "who": "acme"}
    d = run.ok("search", hits=[{"url": "u1"}, {"url": "u2"}])
    assert d.tasks[0].input == {"doc": "u1", "run": RUN, "wf": "wf", "all": {"query": "kafka", "extra": 1}}
    assert resolve_input(MAPPED, run.s, "read") == d.tasks[0].input


def test_input_mapping_error_quarantines() -> None:
    run = Run(MAPPED)
    run.request(input={"query": "kafka"})
    run.ok("search", hits=[{"url": "u1"}])
    d = run.ok("read", text="t")
    assert typed_steps(d) == [("step.succeeded", "read"), ("run.quarantined", "answer")]
    assert d.tasks == ()
    assert d.quarantine is not None
    assert (d.quarantine.step, d.quarantine.attempt, d.quarantine.error_type) == (
        "answer",
        0,
        "InputMappingError",
    )
    assert "'steps.read.nothing'" in d.quarantine.error
    st = run.s.steps["answer"]
    assert (st.status, st.attempt) == ("failed", 0)
    assert (run.s.status, run.s.error_type) == ("quarantined", "InputMappingError")
    with pytest.raises(InputMappingError):
        resolve_input(MAPPED, run.s, "answer")


def test_input_mapping_error_on_first_step_quarantines_at_request() -> None:
    run = Run(MAPPED)
    d = run.request(input={"not_query": 1})
    assert types(d) == ["run.requested", "run.quarantined"]
    assert d.quarantine is not None and d.quarantine.error_type == "InputMappingError"
    assert run.s.is_terminal()


def test_no_input_mapping_passes_run_input() -> None:
    run = Run(LINEAR)
    d = run.request(input={"k": {"nested": [1]}})
    assert d.tasks[0].input == {"k": {"nested": [1]}}


# -- purity ----------------------------------------------------------------------------------------


def test_decider_never_mutates_its_input_state() -> None:
    run, _ = _saga_until_ship_fails()  # Run.feed compares model_dump before/after on every call
    state = run.s
    snapshot = state.model_dump()
    events: list[DeciderInput] = [
        StepResult(RUN, "charge", 2, 9999, kind="compensate", output={"x": 1}),
        StepResult(RUN, "charge", 2, 9999, kind="compensate", error_type="E"),
        TimerFired(RUN, 10**9),
        RedriveRequested(RUN, 10**9),
        RunRequested(RUN, "wf", {}, 10**9),
    ]
    for event in events:
        decide(SAGA, state, event)
        assert state.model_dump() == snapshot


# -- known bugs ------------------------------------------------------------------------------------

CANCELLED_TASK_BUG = (
    "decider.py _Builder.on_timer (lines 241-257) issues due steps in name order before handling "
    "a deadline that quarantines the run: the decision carries a StepTask for a step it cancels "
    "in the same decision"
)


def test_redelivered_timer_is_ignored() -> None:
    def history(duplicate: bool) -> RunState:
        run = Run(FAN)
        run.request(at=0)
        run.ok("split", at=0)
        run.fail("left", at=100)  # retry due at ~100 + 500
        early = run.timer(200)  # nothing due yet: ignored
        assert early.ignored is not None
        run.ok("right", at=5000, v="r")  # the clock moves past left's due time
        if duplicate:
            run.timer(200)  # the same timer record, delivered again
        run.timer(6000)
        run.ok("left", attempt=2, at=6500, v="l")
        return run.s

    assert history(duplicate=True).model_dump() == history(duplicate=False).model_dump()


def test_no_task_issued_for_step_cancelled_in_same_decision() -> None:
    backoff = {"initial_backoff_s": 0.001, "jitter": 0}
    wf = parse_workflow(
        {
            "name": "w",
            "budget_usd": "1",
            "steps": [
                {"name": "a", "agent": "x", "next": ["b", "c"]},
                {"name": "b", "agent": "x", "retry": backoff},
                {"name": "c", "agent": "x", "estimated_cost_usd": "0.6", "retry": backoff},
            ],
        }
    )
    run = Run(wf)
    run.request(at=0)
    run.ok("a", at=0)
    run.fail("b", at=1)  # b due again at 2
    # c's failed attempt cost $0.5: its retry (estimated $0.6) would pass the $1 budget
    run.feed(StepResult(RUN, "c", 1, 1, error_type="Boom", error="x", cost=StepCost(cost_usd=Decimal("0.5"))))
    d = run.timer(1000)  # b's retry is issued first, then c's stops the run: b is cancelled with it
    assert run.s.status == "over_budget" and run.s.steps["b"].status == "cancelled"
    assert task_ids(d) == []


def test_redrive_after_compensation_does_not_complete_on_undone_steps() -> None:
    run, _ = _saga_until_ship_fails()
    run.ok("charge", attempt=2, at=1100, kind="compensate")
    run.ok("reserve", attempt=2, at=1200, kind="compensate")
    d = run.redrive(at=5000)
    if d.ignored is None:  # either refuse the redrive, or redo (not skip) the compensated steps
        for task in d.tasks:
            run.ok(task.step, attempt=task.attempt, at=6000)
    done = {n: st.status for n, st in run.s.steps.items()}
    assert not (run.s.status == "completed" and "compensated" in done.values()), done

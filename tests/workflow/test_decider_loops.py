"""Bounded loops (``kind: loop``) and agent-chosen routes (``route``): decided purely, recorded, replayed.

Unit cases pin each rule; the hypothesis cases drive runs with any scores, failures and completion
order and check that loops end within their bound and that re-deciding the history reproduces the run.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmrun.check.invariants import check_run
from calmrun.errors import ConfigError, ErrorKind
from calmrun.workflow.decider import Decision, decide, expired
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import DeciderInput, RunRequested, StepResult, StepTask, TimerFired
from calmrun.workflow.history import fold, inputs_from_events
from calmrun.workflow.state import RunState

RUN = "run-l"


def critique(**loop: Any) -> WorkflowDef:
    return parse_workflow(
        {
            "name": "essay",
            "outcomes": ["needs_review"],
            "steps": [
                {"name": "draft", "agent": "drafter", "input": {"topic": "input.topic"}, "next": "critique"},
                {"name": "critique", "agent": "critic", "next": "enough", "retry": {"max_attempts": 2}},
                {
                    "name": "enough",
                    "kind": "loop",
                    "goto": "draft",
                    "max_iterations": 3,
                    "until": {"field": "steps.critique.score", "op": "ge", "value": 0.8},
                    "next": "publish",
                    "on_exhausted": "end:needs_review",
                    **loop,
                },
                {"name": "publish", "agent": "publisher"},
            ],
        }
    )


class Run:
    """Feeds a run one input at a time, keeping its state, events and tasks in flight."""

    def __init__(self, wf: WorkflowDef, **inp: Any) -> None:
        self.wf, self.state, self.events, self.inputs = wf, None, [], []  # type: ignore[var-annotated]
        self.tasks: list[StepTask] = []
        self.feed(RunRequested(RUN, wf.name, inp, 1000))

    def feed(self, inp: DeciderInput) -> Decision:
        d = decide(self.wf, self.state, inp)
        if d.ignored is None:
            self.state, self.inputs = d.state, [*self.inputs, inp]
            self.events = [*self.events, *d.events]
            self.tasks = [*self.tasks, *d.tasks]
        return d

    @property
    def s(self) -> RunState:
        assert self.state is not None
        return self.state

    def answer(self, step: str, output: dict[str, Any] | None = None, error: str | None = None) -> Decision:
        task = next(t for t in reversed(self.tasks) if t.step == step)
        at = self.s.clock_ms + 10
        return self.feed(
            StepResult(RUN, step, task.attempt, at, output=output, error_type=error, error=error)
        )

    def types(self, step: str | None = None) -> list[str]:
        return [e.type for e in self.events if step is None or e.step == step]


def test_the_loop_goes_back_until_the_critic_is_satisfied() -> None:
    r = Run(critique(), topic="kafka")
    r.answer("draft", {"text": "v1"})
    r.answer("critique", {"score": 0.5, "feedback": "more"})
    assert r.s.steps["draft"].iteration == 1 and r.s.steps["draft"].status == "scheduled"
    assert r.s.steps["critique"].status == "looped" and r.s.steps["critique"].output == {
        "score": 0.5,
        "feedback": "more",
    }
    looped = next(e for e in r.events if e.type == "step.looped")
    assert looped.data == {"iteration": 1, "to": "draft", "body": ["draft", "critique"]}
    again = r.tasks[-1]
    assert (again.step, again.attempt, again.iteration) == ("draft", 2, 1)
    assert again.idempotency_key == f"{RUN}/draft#1/run/2"  # attempts go on: a key is never reused
    scheduled = [e for e in r.events if e.type == "step.scheduled" and e.step == "draft"]
    assert [e.data.get("iteration") for e in scheduled] == [None, 1]
    r.answer("draft", {"text": "v2"})
    r.answer("critique", {"score": 0.9})
    assert r.s.steps["enough"].output == {"iterations": 2, "until": True}
    r.answer("publish", {"ok": True})
    assert (r.s.status, r.s.outcome) == ("completed", "completed")
    assert fold(r.wf, inputs_from_events(r.events)) == (r.state, r.events)  # re-decided exactly
    violations, _, replayed = check_run(RUN, r.events, r.state, 0, [r.wf])
    assert violations == [] and replayed


def test_a_late_result_of_an_earlier_iteration_is_ignored() -> None:
    r = Run(critique(), topic="t")
    first = r.tasks[-1]
    r.answer("draft", {"text": "v1"})
    r.answer("critique", {"score": 0.1})
    late = r.feed(StepResult(RUN, "draft", first.attempt, 5000, output={"text": "late"}))
    assert late.ignored is not None and "late or duplicate" in late.ignored


def test_past_the_bound_the_loop_takes_on_exhausted_or_quarantines() -> None:
    for loop, want in (({}, ("completed", "needs_review")), ({"on_exhausted": None}, ("quarantined", None))):
        r = Run(critique(**loop), topic="t")
        for _ in range(3):
            r.answer("draft", {"text": "x"})
            r.answer("critique", {"score": 0.1})
        assert (r.s.status, r.s.outcome) == want
        assert r.types("draft").count("step.scheduled") == 3 and "step.loop_exhausted" in r.types("enough")
        if r.s.status == "quarantined":
            assert r.s.error_type == ErrorKind.LOOP_EXHAUSTED


def test_a_loop_without_until_runs_its_body_max_iterations_times() -> None:
    r = Run(critique(until=None, max_iterations=2), topic="t")
    for _ in range(2):
        r.answer("draft", {"text": "x"})
        r.answer("critique", {"score": 0.1})
    assert r.s.steps["enough"].output == {"iterations": 2, "until": False}
    assert r.s.steps["publish"].status == "scheduled"


def test_a_failing_step_in_the_loop_retries_within_its_iteration_and_the_deadline_reissues() -> None:
    r = Run(critique(), topic="t")
    r.answer("draft", {"text": "x"})
    r.answer("critique", {"score": 0.1})
    r.answer("draft", error="Boom")
    st_ = r.s.steps["draft"]
    assert (st_.status, st_.iteration, st_.attempt, st_.retry_base) == ("retry_wait", 1, 2, 1)
    assert st_.due_ms is not None
    r.feed(TimerFired(RUN, st_.due_ms))
    assert r.s.steps["draft"].attempt == 3 and r.tasks[-1].iteration == 1
    deadline = r.s.steps["draft"].deadline_ms
    assert deadline is not None and expired(r.s, deadline) == [f"{RUN}/draft#1/run/3"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"goto": "nope"}, "step 'enough' goto: unknown step 'nope'"),
        ({"goto": "publish"}, "'publish' does not lead back to 'enough'"),
        ({"max_iterations": None}, "steps[2] (enough).max_iterations"),
        ({"max_iterations": 0}, "steps[2] (enough).max_iterations"),
        ({"agent": "x"}, "kind loop takes no agent"),
    ],
)
def test_invalid_loops_are_refused_with_the_step_and_field(change: dict[str, Any], fragment: str) -> None:
    data = critique().model_dump(mode="json")
    data["steps"][2].update(change)
    with pytest.raises(ConfigError, match=None) as info:
        parse_workflow(data, source="essay.yaml")
    assert "essay.yaml" in str(info.value) and fragment in str(info.value), str(info.value)


def test_a_plain_cycle_and_a_nested_loop_are_refused() -> None:
    data = critique().model_dump(mode="json")
    data["steps"][1]["next"] = "draft"
    with pytest.raises(ConfigError, match="steps form a cycle"):
        parse_workflow(data)
    nested = critique().model_dump(mode="json")
    nested["steps"][2]["next"] = "outer"
    nested["steps"].append({"name": "outer", "kind": "loop", "goto": "draft", "max_iterations": 2})
    with pytest.raises(ConfigError, match="loops do not nest"):
        parse_workflow(nested)


# -- routes --------------------------------------------------------------------------------------


def triage(**route: Any) -> WorkflowDef:
    return parse_workflow(
        {
            "name": "tickets",
            "outcomes": ["spam"],
            "steps": [
                {
                    "name": "triage",
                    "agent": "triager",
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0},
                    "route": {"field": "handler", "allowed": ["billing", "fraud", "end:spam"], **route},
                },
                {"name": "billing", "agent": "b"},
                {"name": "fraud", "agent": "f"},
            ],
        }
    )


def test_the_agent_chooses_the_next_step_from_the_allowed_set() -> None:
    r = Run(triage())
    r.answer("triage", {"handler": "fraud"})
    routed = next(e for e in r.events if e.type == "run.routed")
    assert routed.data == {"to": ["fraud"], "by": "route"}
    assert r.s.steps["fraud"].status == "scheduled" and "billing" not in r.s.steps
    r2 = Run(triage())
    r2.answer("triage", {"handler": "end:spam"})
    assert (r2.s.status, r2.s.outcome) == ("completed", "spam")


def test_a_route_outside_the_set_fails_that_attempt() -> None:
    r = Run(triage())
    r.answer("triage", {"handler": "legal"})
    refused = next(e for e in r.events if e.type == "step.route_refused")
    assert refused.data["value"] == "legal" and refused.data["allowed"] == ["billing", "fraud", "end:spam"]
    assert (
        r.s.steps["triage"].status == "retry_wait"
        and r.s.steps["triage"].error_type == ErrorKind.INVALID_ROUTE
    )
    r.feed(TimerFired(RUN, r.s.steps["triage"].due_ms or 0))
    r.answer("triage", {})  # no choice at all
    assert r.s.status == "quarantined" and r.s.error_type == ErrorKind.INVALID_ROUTE
    assert "chose nothing in 'handler'" in (r.s.error or "")
    assert fold(r.wf, inputs_from_events(r.events)) == (r.state, r.events)


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ({"next": "billing"}, "a step with route takes no next or branches"),
        (
            {"route": {"field": "h", "allowed": ["nope"]}},
            "step 'triage' route.allowed[0]: unknown step 'nope'",
        ),
        ({"route": {"field": "h", "allowed": []}}, "route.allowed"),
    ],
)
def test_invalid_routes_are_refused(step: dict[str, Any], fragment: str) -> None:
    data = triage().model_dump(mode="json")
    data["steps"][0].update(step)
    with pytest.raises(ConfigError) as info:
        parse_workflow(data)
    assert fragment in str(info.value), str(info.value)


# -- properties ------------------------------------------------------------------------------------

Outcome = tuple[float, bool]  # (the critic's score, whether the attempt fails instead)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_iterations=st.integers(1, 5),
    answers=st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=40),
    swap=st.booleans(),
)
def test_loops_end_within_their_bound_and_replay_exactly(
    max_iterations: int, answers: list[Outcome], swap: bool
) -> None:
    wf = critique(max_iterations=max_iterations)
    r = Run(wf, topic="t")
    feed = iter(answers)
    for _ in range(500):
        if r.s.is_terminal():
            break
        live = [
            n for n, s in sorted(r.s.steps.items()) if s.status == "scheduled" and s.deadline_ms is not None
        ]
        if not live:
            due = r.s.next_due_ms()
            assert due is not None, "a running run with nothing in flight waits for a timer"
            r.feed(TimerFired(RUN, due))
            continue
        name = live[-1] if swap else live[0]
        score, fails = next(feed, (1.0, False))
        if fails:
            r.answer(name, error="Flaky")
        else:
            r.answer(name, {"score": score, "text": "x"})
    assert r.s.is_terminal()
    drafts = [e for e in r.events if e.type == "step.scheduled" and e.step == "draft"]
    iterations = {e.data.get("iteration", 0) for e in drafts}
    assert max(iterations) < max_iterations  # never past the bound
    assert sorted(iterations) == list(range(len(iterations)))  # one after another, none skipped
    assert fold(wf, inputs_from_events(r.events)) == (r.state, r.events)
    violations, _, _ = check_run(RUN, r.events, r.state, 1 if r.s.status == "quarantined" else 0, [wf])
    assert violations == []

"""Map steps (``kind: map``): one attempt per element, at most max_concurrency in flight, outputs in
element order whatever the completion order, a policy for failed elements, and a compact state."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmrun.check.invariants import check_run
from calmrun.errors import ConfigError, ErrorKind
from calmrun.workflow.decider import decide, expired, task_ignored
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RedriveRequested, StepResult, TimerFired
from calmrun.workflow.history import fold, inputs_from_events
from tests.workflow.test_decider_loops import RUN, Run


def invoices(**match: Any) -> WorkflowDef:
    return parse_workflow(
        {
            "name": "invoices",
            "steps": [
                {"name": "extract", "agent": "extractor", "next": "match"},
                {
                    "name": "match",
                    "kind": "map",
                    "for_each": "steps.extract.lines",
                    "agent": "matcher",
                    "input": {"vendor": "input.vendor"},
                    "max_concurrency": 3,
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0.1},
                    "next": "reconcile",
                    **match,
                },
                {"name": "reconcile", "agent": "reconciler", "input": {"matches": "steps.match.items"}},
            ],
        }
    )


def element_tasks(r: Run) -> dict[int, Any]:
    """The newest task of each element still in flight."""
    out = {}
    for t in r.tasks:
        if t.element is not None and task_ignored(r.state, t, 0) is None:
            out[t.element] = t
    return out


def answer_element(r: Run, i: int, output: dict[str, Any] | None = None, error: str | None = None) -> None:
    t = element_tasks(r)[i]
    at = r.s.clock_ms + 5
    r.feed(StepResult(RUN, "match", t.attempt, at, output=output, error_type=error, error=error, element=i))


def test_elements_run_at_most_max_concurrency_at_once_and_gather_in_order() -> None:
    r = Run(invoices(), vendor="acme")
    r.answer("extract", {"lines": ["a", "b", "c", "d", "e"]})
    m = r.s.steps["match"].map
    assert m is not None and (m.size, m.issued, sorted(m.running)) == (5, 3, ["0", "1", "2"])
    first = element_tasks(r)[0]
    assert first.input == {"vendor": "acme", "item": "a", "index": 0}
    assert first.idempotency_key == f"{RUN}/match[0]/run/1"
    for i in (2, 0, 1, 4, 3):  # completed out of order: 3 and 4 start as others finish
        assert len(element_tasks(r)) <= 3
        answer_element(r, i, {"line": element_tasks(r)[i].input["item"]})
    done = r.s.steps["match"]
    assert done.status == "succeeded"
    assert done.output == {"items": [{"line": x} for x in "abcde"]}
    assert r.s.steps["reconcile"].status == "scheduled"
    assert fold(r.wf, inputs_from_events(r.events)) == (r.state, r.events)
    violations, _, replayed = check_run(RUN, r.events, r.state, 0, [r.wf])
    assert violations == [] and replayed


def test_a_failed_element_is_retried_then_fails_the_step_or_is_collected() -> None:
    for policy in ("fail", "collect"):
        r = Run(invoices(on_element_failure=policy, max_concurrency=2), vendor="v")
        r.answer("extract", {"lines": [1, 2]})
        answer_element(r, 1, error="Boom")
        el = r.s.steps["match"].map.running["1"]  # type: ignore[union-attr]
        assert el.due_ms is not None and el.deadline_ms is None
        r.feed(TimerFired(RUN, el.due_ms))
        assert element_tasks(r)[1].attempt == 2
        answer_element(r, 1, error="Boom")
        if policy == "fail":
            assert r.s.status == "quarantined" and r.s.steps["match"].error == "element 1: Boom"
            assert task_ignored(r.state, r.tasks[-1], 0) is not None  # element 0's task runs no more
            continue
        answer_element(r, 0, {"ok": 1})
        out = r.s.steps["match"].output
        assert out is not None and out["items"] == [{"ok": 1}, None]
        assert out["errors"] == [{"index": 1, "attempt": 2, "error_type": "Boom", "error": "Boom"}]


def test_a_redrive_issues_only_the_failed_elements_with_new_attempt_numbers() -> None:
    r = Run(invoices(retry={"max_attempts": 1}), vendor="v")
    r.answer("extract", {"lines": ["a", "b"]})
    answer_element(r, 0, {"ok": 0})
    answer_element(r, 1, error="Down")
    assert r.s.status == "quarantined"
    r.feed(RedriveRequested(RUN, r.s.clock_ms + 1))
    again = element_tasks(r)
    assert (
        list(again) == [1] and again[1].attempt == 2 and again[1].idempotency_key.endswith("match[1]/run/2")
    )
    answer_element(r, 1, {"ok": 1})
    assert r.s.steps["match"].output == {"items": [{"ok": 0}, {"ok": 1}]}


def test_a_lost_element_task_is_reissued_under_the_same_key() -> None:
    r = Run(invoices(), vendor="v")
    r.answer("extract", {"lines": ["a"]})
    before = element_tasks(r)[0]
    deadline = r.s.steps["match"].deadline_ms
    assert deadline is not None and expired(r.s, deadline) == [before.idempotency_key]
    r.feed(TimerFired(RUN, deadline))
    after = element_tasks(r)[0]
    assert after.idempotency_key == before.idempotency_key and after is not before
    assert "step.reissued" in r.types("match")


def test_an_element_output_over_max_element_bytes_fails_that_attempt() -> None:
    r = Run(invoices(max_element_bytes=32, retry={"max_attempts": 1}), vendor="v")
    r.answer("extract", {"lines": ["a"]})
    answer_element(r, 0, {"text": "x" * 100})
    assert r.s.status == "quarantined" and r.s.error_type == ErrorKind.INVALID_OUTPUT


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (None, "'steps.extract.lines' is not in the run"),
        ("abc", "is a str, not a list"),
        ([1] * 4, "over max_elements"),
    ],
)
def test_a_map_over_a_missing_list_a_non_list_or_too_many_quarantines(lines: Any, fragment: str) -> None:
    r = Run(invoices(max_elements=3), vendor="v")
    r.answer("extract", {} if lines is None else {"lines": lines})
    assert (
        r.s.status == "quarantined"
        and r.s.error_type == ErrorKind.INPUT_MAPPING
        and fragment in (r.s.error or "")
    )


def test_an_empty_list_succeeds_at_once() -> None:
    r = Run(invoices(), vendor="v")
    r.answer("extract", {"lines": []})
    assert r.s.steps["match"].output == {"items": []} and r.s.steps["reconcile"].status == "scheduled"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"for_each": "steps.nope.x"}, "for_each: unknown step"),
        ({"for_each": "lines"}, "for_each: a list in input.<field>"),
        ({"max_concurrency": 0}, "steps[1] (match).max_concurrency"),
        ({"agent": None}, "steps[1] (match).agent"),
        ({"input": {"item": "input.x"}}, "the element's own argument"),
        ({"approvers": ["a"]}, "kind map takes no approvers"),
    ],
)
def test_invalid_maps_are_refused(change: dict[str, Any], fragment: str) -> None:
    data = invoices().model_dump(mode="json")
    data["steps"][1].update(change)
    with pytest.raises(ConfigError) as info:
        parse_workflow(data, source="inv.yaml")
    assert "inv.yaml" in str(info.value) and fragment in str(info.value), str(info.value)


def test_the_state_of_a_wide_map_holds_only_the_elements_in_flight() -> None:
    r = Run(invoices(max_elements=2000, max_concurrency=8), vendor="v")
    r.answer("extract", {"lines": list(range(1000))})
    for _ in range(500):
        answer_element(r, min(element_tasks(r)), {"m": 1})
    m = r.s.steps["match"].map
    assert m is not None and len(m.running) == 8 and m.issued == 508 and m.done == 500


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(0, 25),
    concurrency=st.integers(1, 6),
    seed=st.integers(0, 2**32),
    fail_rate=st.sampled_from([0.0, 0.2]),
)
def test_map_output_order_equals_input_order_under_any_completion_order(
    width: int, concurrency: int, seed: int, fail_rate: float
) -> None:
    rng = random.Random(seed)
    wf = invoices(
        max_concurrency=concurrency,
        retry={"max_attempts": 3, "initial_backoff_s": 0},
        on_element_failure="collect",
    )
    r = Run(wf, vendor="v")
    r.answer("extract", {"lines": [f"l{i}" for i in range(width)]})
    for _ in range(10 * width + 10):
        if r.s.steps["match"].status != "scheduled":
            break
        live = element_tasks(r)
        assert len(live) <= concurrency
        if not live:
            due = r.s.next_due_ms()
            assert due is not None
            r.feed(TimerFired(RUN, due))
            continue
        i = rng.choice(sorted(live))
        if rng.random() < fail_rate:
            answer_element(r, i, error="Flaky")
        else:
            answer_element(r, i, {"of": live[i].input["item"]})
        if rng.random() < 0.1:  # a copy delivered again changes nothing
            t = live[i]
            dup = decide(
                wf,
                r.state,
                StepResult(RUN, "match", t.attempt, r.s.clock_ms, output={"of": "dup"}, element=i),
            )
            assert dup.ignored is not None
    out = r.s.steps["match"].output
    assert out is not None
    failed = {e["index"] for e in out.get("errors", [])}
    assert [o["of"] if o else None for o in out["items"]] == [
        None if i in failed else f"l{i}" for i in range(width)
    ]
    assert fold(wf, inputs_from_events(r.events)) == (r.state, r.events)
    assert check_run(RUN, r.events, r.state, 0, [wf])[0] == []


def test_status_shows_the_iteration_and_the_elements_done() -> None:
    from calmrun.cli.runs import step_status

    r = Run(invoices(max_concurrency=2), vendor="v")
    r.answer("extract", {"lines": ["a", "b", "c"]})
    answer_element(r, 0, {"ok": 0})
    assert step_status(r.s.steps["match"]) == "scheduled (1/3 elements, 2 in flight)"
    assert (
        step_status(r.s.steps["match"].model_copy(update={"iteration": 2, "map": None}))
        == "scheduled (iteration 2)"
    )

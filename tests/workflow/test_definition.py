"""Workflow definitions: validation of YAML/dict definitions, error messages, conditions and targets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from calmrun.errors import ConfigError
from calmrun.workflow.definition import (
    Condition,
    RetryPolicy,
    StepDef,
    WorkflowDef,
    load_workflow,
    lookup,
    parse_workflow,
    targets,
)

_DELETE = object()


def base() -> dict[str, Any]:
    """A valid two-step workflow; tests mutate a fresh copy."""
    return {
        "name": "orders",
        "steps": [
            {"name": "fetch", "agent": "fetcher", "next": "extract"},
            {"name": "extract", "agent": "extractor", "next": "end:completed"},
        ],
    }


def with_value(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """``base()`` with the value at ``path`` replaced (or deleted with ``_DELETE``)."""
    data = base()
    cur: Any = data
    for p in path[:-1]:
        cur = cur[p]
    if value is _DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = copy.deepcopy(value)
    return data


def config_error(data: Any, source: str = "x.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_workflow(data, source=source)
    return str(info.value)


# -- valid definitions -----------------------------------------------------------------------------


def test_minimal_definition_gets_defaults() -> None:
    wf = parse_workflow({"name": "w", "steps": [{"name": "only", "agent": "a"}]})
    assert wf.version == "1"
    assert wf.outcomes == ["completed"]
    assert wf.first == "only"
    assert wf.deadline_grace_s == 30.0
    step = wf.step("only")
    assert step.retry == RetryPolicy()
    assert (step.retry.max_attempts, step.retry.initial_backoff_s, step.retry.multiplier) == (3, 0.5, 2.0)
    assert step.timeout_s == 30.0
    assert step.next is None and step.branches == [] and step.needs == [] and step.input is None


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        (["approved", "rejected"], ["approved", "rejected", "completed"]),
        (["completed", "approved"], ["completed", "approved"]),
        (["completed"], ["completed"]),
        ([], ["completed"]),
    ],
)
def test_completed_is_always_an_outcome(outcomes: list[str], expected: list[str]) -> None:
    data = base()
    data["outcomes"] = outcomes
    assert parse_workflow(data).outcomes == expected


def test_completed_added_outcome_is_usable_as_target() -> None:
    data = base()
    data["outcomes"] = ["approved"]
    data["steps"][0]["branches"] = [{"when": {"field": "ok", "value": True}, "goto": "end:approved"}]
    wf = parse_workflow(data)
    assert wf.step("extract").next == "end:completed"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.update(start=["fetch", "extract"]), id="start-fan-out"),
        pytest.param(lambda d: d.update(start="end:completed"), id="start-at-end"),
        pytest.param(
            lambda d: d["steps"][1].update(
                input={"q": "input.q", "f": "steps.fetch.items.0", "r": "run.run_id"}
            ),
            id="input-mapping",
        ),
        pytest.param(lambda d: d["steps"][1].update(input={"all": "input"}), id="input-whole-run-input"),
        pytest.param(lambda d: d["steps"][1].update(needs=["fetch"]), id="needs-earlier-step"),
        pytest.param(lambda d: d["steps"][0].update(compensate="undo_fetch", model="fast"), id="compensate"),
        pytest.param(
            lambda d: d["steps"][0].update(
                branches=[{"when": {"field": "x", "op": "gt", "value": 1}, "goto": ["extract"]}], next=None
            ),
            id="branch-list-goto",
        ),
    ],
)
def test_valid_definitions_are_accepted(mutate: Any) -> None:
    data = base()
    mutate(data)
    parse_workflow(data, source="x.yaml")


def test_diamond_is_not_a_cycle() -> None:
    wf = parse_workflow(
        {
            "name": "diamond",
            "steps": [
                {"name": "a", "agent": "x", "next": ["b", "c"]},
                {"name": "b", "agent": "x", "next": "d"},
                {"name": "c", "agent": "x", "next": "d"},
                {"name": "d", "agent": "x", "needs": ["b", "c"]},
            ],
        }
    )
    assert WorkflowDef.successors(wf.step("a")) == ["b", "c"]
    assert WorkflowDef.successors(wf.step("d")) == []


def test_python_objects_are_validated_like_yaml() -> None:
    wf = WorkflowDef(name="w", steps=[StepDef(name="a", agent="x", next="b"), StepDef(name="b", agent="y")])
    assert parse_workflow(wf.model_dump()) == wf
    with pytest.raises(ValidationError, match="unknown step 'nope'"):
        WorkflowDef(name="w", steps=[StepDef(name="a", agent="x", next="nope")])


def test_definitions_are_frozen() -> None:
    wf = parse_workflow(base())
    with pytest.raises(ValidationError):
        wf.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        wf.steps[0].agent = "other"  # type: ignore[misc]


def test_step_lookup_and_first() -> None:
    wf = parse_workflow({**base(), "start": "extract"})
    assert wf.first == "extract"
    assert wf.step("fetch").agent == "fetcher"
    with pytest.raises(KeyError):
        wf.step("nope")
    assert WorkflowDef.successors(wf.step("fetch")) == ["extract"]
    assert WorkflowDef.successors(wf.step("extract")) == []


# -- field errors name the source, the step and the field ------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "fragments"),
    [
        (
            ("steps", 1, "retry"),
            {"max_attempts": 0},
            ["steps[1] (extract).retry.max_attempts", "greater than"],
        ),
        (
            ("steps", 1, "retry"),
            {"max_attempts": 101},
            ["steps[1] (extract).retry.max_attempts", "less than"],
        ),
        (("steps", 0, "retry"), {"jitter": 2}, ["steps[0] (fetch).retry.jitter"]),
        (("steps", 0, "retry"), {"multiplier": 0.5}, ["steps[0] (fetch).retry.multiplier"]),
        (("steps", 0, "retry"), {"initial_backoff_s": -1}, ["steps[0] (fetch).retry.initial_backoff_s"]),
        (("steps", 0, "retry"), {"max_attemps": 3}, ["steps[0] (fetch).retry.max_attemps", "Extra inputs"]),
        (("steps", 0, "timeout_s"), 0, ["steps[0] (fetch).timeout_s", "greater than 0"]),
        (("steps", 1, "agnet"), "x", ["steps[1] (extract).agnet", "Extra inputs"]),
        (("steps", 1, "agent"), _DELETE, ["steps[1] (extract)", "an agent step needs `agent`"]),
        (("steps", 0, "name"), "Fetch!", ["steps[0] (Fetch!).name", "pattern"]),
        (("steps", 0, "input"), {"q": 3}, ["steps[0] (fetch).input.q"]),
        (("steps", 0, "needs"), "extract", ["steps[0] (fetch).needs"]),
        (
            ("steps", 0, "branches"),
            [{"when": {"field": "x", "op": "regex"}, "goto": "extract"}],
            ["steps[0] (fetch).branches[0].when.op"],
        ),
        (("steps", 0, "branches"), [{"when": {"field": "x"}}], ["steps[0] (fetch).branches[0].goto"]),
        (("name",), "Bad Name", ["name: ", "pattern"]),
        (("steps",), [], ["steps: ", "at least 1"]),
        (("deadline_grace_s",), -1, ["deadline_grace_s"]),
        (("colour",), "red", ["colour", "Extra inputs"]),
    ],
)
def test_field_errors_name_source_step_and_field(
    path: tuple[str | int, ...], value: Any, fragments: list[str]
) -> None:
    msg = config_error(with_value(path, value))
    assert msg.startswith("x.yaml: invalid workflow: ")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_step_without_name_is_reported_by_index() -> None:
    data = base()
    del data["steps"][1]["name"]
    msg = config_error(data)
    assert "steps[1].name: Field required" in msg


def test_several_errors_are_all_reported() -> None:
    data = base()
    data["steps"][0]["timeout_s"] = -1
    data["steps"][1]["retry"] = {"max_attempts": 0}
    msg = config_error(data)
    assert "steps[0] (fetch).timeout_s" in msg
    assert "steps[1] (extract).retry.max_attempts" in msg
    assert "; " in msg


@pytest.mark.parametrize("data", [None, [], "steps", 3])
def test_non_mapping_is_refused(data: Any) -> None:
    msg = config_error(data)
    assert msg.startswith("x.yaml: invalid workflow: workflow: ")


# -- graph errors ----------------------------------------------------------------------------------


def _graph(mutate: Any) -> dict[str, Any]:
    data = base()
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        pytest.param(
            lambda d: d["steps"][0].update(next="nope"),
            ["step 'fetch' next: unknown step 'nope'", "['fetch', 'extract']"],
            id="next-unknown",
        ),
        pytest.param(
            lambda d: d["steps"][0].update(next=["extract", "nope"]),
            ["step 'fetch' next: unknown step 'nope'"],
            id="next-list-unknown",
        ),
        pytest.param(
            lambda d: d["steps"][0].update(
                branches=[
                    {"when": {"field": "x"}, "goto": "extract"},
                    {"when": {"field": "y"}, "goto": "nope"},
                ]
            ),
            ["step 'fetch' branches[1].goto: unknown step 'nope'"],
            id="branch-unknown",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(needs=["fetch", "nope"]),
            ["step 'extract' needs unknown step 'nope'"],
            id="needs-unknown",
        ),
        pytest.param(lambda d: d.update(start="nope"), ["start: unknown step 'nope'"], id="start-unknown"),
        pytest.param(
            lambda d: d.update(start=["fetch", "nope"]),
            ["start: unknown step 'nope'"],
            id="start-list-unknown",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(next="end:approved"),
            ["step 'extract' next: outcome 'approved' is not in outcomes ['completed']"],
            id="next-unknown-outcome",
        ),
        pytest.param(
            lambda d: d["steps"][0].update(branches=[{"when": {"field": "x"}, "goto": "end:rejected"}]),
            ["step 'fetch' branches[0].goto: outcome 'rejected' is not in outcomes"],
            id="branch-unknown-outcome",
        ),
        pytest.param(
            lambda d: d.update(start="end:nope"),
            ["start: outcome 'nope' is not in outcomes"],
            id="start-outcome",
        ),
        pytest.param(
            lambda d: d["steps"].append({"name": "fetch", "agent": "again"}),
            ["step names must be unique; repeated: ['fetch']"],
            id="duplicate-names",
        ),
        pytest.param(
            lambda d: d["steps"][0].update(next="fetch"),
            ["steps form a cycle: fetch -> fetch"],
            id="self-loop",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(next="fetch"),
            ["steps form a cycle: fetch -> extract -> fetch"],
            id="two-cycle",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(next=None, branches=[{"when": {"field": "x"}, "goto": ["fetch"]}]),
            ["steps form a cycle", "each step runs once per run"],
            id="branch-cycle",
        ),
        pytest.param(
            lambda d: (
                d["steps"][1].update(next="load"),
                d["steps"].append({"name": "load", "agent": "l", "next": ["end:completed", "fetch"]}),
            ),
            ["steps form a cycle: fetch -> extract -> load -> fetch"],
            id="three-cycle",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(input={"q": "inputs.q"}),
            ["step 'extract' input 'q': path must start with input. or steps."],
            id="input-bad-head",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(input={"q": "steps.nope.x"}),
            ["step 'extract' input 'q': unknown step 'nope' in 'steps.nope.x'"],
            id="input-unknown-step",
        ),
        pytest.param(
            lambda d: d["steps"][1].update(input={"q": "steps"}),
            ["step 'extract' input 'q': unknown step ''"],
            id="input-steps-without-name",
        ),
    ],
)
def test_graph_errors_are_refused(mutate: Any, fragments: list[str]) -> None:
    msg = config_error(_graph(mutate))
    assert msg.startswith("x.yaml: invalid workflow: workflow: ")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_step_needing_itself_is_refused() -> None:
    data = base()
    data["steps"][1]["needs"] = ["extract"]
    config_error(data)


def test_needs_on_a_downstream_step_is_refused() -> None:
    data = base()
    data["steps"][0]["needs"] = ["extract"]
    config_error(data)


# -- YAML files ------------------------------------------------------------------------------------

YAML_OK = """\
name: orders
version: "2"
outcomes: [approved]
steps:
  - name: fetch
    agent: fetcher
    next: extract
  - name: extract
    agent: extractor
    retry: {max_attempts: 5, initial_backoff_s: 1}
    branches:
      - when: {field: score, op: ge, value: 0.5}
        goto: end:approved
"""


def test_load_workflow_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    path.write_text(YAML_OK)
    wf = load_workflow(path)
    assert (wf.name, wf.version) == ("orders", "2")
    assert wf.outcomes == ["approved", "completed"]
    assert wf.step("extract").retry.max_attempts == 5
    assert wf.step("extract").branches[0].when == Condition(field="score", op="ge", value=0.5)


def test_load_workflow_error_names_file_step_and_field(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(YAML_OK.replace("max_attempts: 5", "max_attempts: 0"))
    with pytest.raises(ConfigError) as info:
        load_workflow(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "x.yaml" in msg
    assert "steps[1] (extract).retry.max_attempts" in msg


def test_load_workflow_graph_error_names_file_and_step(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(YAML_OK.replace("next: extract", "next: extrct"))
    with pytest.raises(
        ConfigError, match=r"x\.yaml: invalid workflow: .*step 'fetch' next: unknown step 'extrct'"
    ):
        load_workflow(path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [unclosed\n", "x.yaml: "),
        ("", "Input should be a valid dictionary"),
        ("- just\n- a list\n", "Input should be a valid dictionary"),
    ],
)
def test_load_workflow_bad_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_workflow(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_load_workflow_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_workflow(path)


# -- conditions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "value", "output", "expected"),
    [
        # eq
        ("eq", 1, {"a": 1}, True),
        ("eq", 1, {"a": 2}, False),
        ("eq", 1, {"a": "1"}, False),
        ("eq", 1, {}, False),
        ("eq", None, {"a": None}, True),
        ("eq", "x", None, False),
        # ne
        ("ne", 1, {"a": 2}, True),
        ("ne", 1, {"a": 1}, False),
        ("ne", 1, {"a": "1"}, True),
        ("ne", 1, {}, True),
        ("ne", 1, None, True),
        # lt / le / gt / ge
        ("lt", 2, {"a": 1}, True),
        ("lt", 2, {"a": 2}, False),
        ("lt", 2, {"a": "x"}, False),
        ("lt", 2, {"a": None}, False),
        ("lt", 2, {}, False),
        ("le", 2, {"a": 2}, True),
        ("le", 2, {"a": 3}, False),
        ("le", 2, {"a": [2]}, False),
        ("le", 2, {}, False),
        ("gt", 2, {"a": 3}, True),
        ("gt", 2, {"a": 2}, False),
        ("gt", 2, {"a": None}, False),
        ("gt", 2, {}, False),
        ("ge", 0.5, {"a": 0.5}, True),
        ("ge", 0.5, {"a": 0.4}, False),
        ("ge", 0.5, {"a": "0.9"}, False),
        ("ge", 0.5, {}, False),
        ("gt", "b", {"a": "c"}, True),
        # in / not_in
        ("in", [1, 2], {"a": 1}, True),
        ("in", [1, 2], {"a": 3}, False),
        ("in", [1, 2], {}, False),
        ("in", "abc", {"a": "b"}, True),
        ("in", "abc", {"a": 1}, False),
        ("in", None, {"a": 1}, False),
        ("in", 5, {"a": 1}, False),
        ("not_in", [1, 2], {"a": 3}, True),
        ("not_in", [1, 2], {"a": 1}, False),
        ("not_in", [1, 2], {}, True),
        ("not_in", None, {"a": 1}, False),
        ("not_in", "abc", {"a": 1}, False),
        # exists
        ("exists", None, {"a": 0}, True),
        ("exists", None, {"a": None}, True),
        ("exists", None, {}, False),
        ("exists", True, {"a": 1}, True),
        ("exists", True, {}, False),
        ("exists", False, {}, True),
        ("exists", False, {"a": 1}, False),
        ("exists", None, None, False),
    ],
)
def test_condition_ops(op: str, value: Any, output: Any, expected: bool) -> None:
    assert Condition(field="a", op=op, value=value).holds(output) is expected


@pytest.mark.parametrize(
    ("field", "output", "expected"),
    [
        ("a.b.c", {"a": {"b": {"c": 1}}}, True),
        ("a.b.c", {"a": {"b": {"c": 2}}}, False),
        ("a.b.c", {"a": {"b": 1}}, False),
        ("a.b.c", {"a": {"x": {"c": 1}}}, False),
        ("items.1.id", {"items": [{"id": 0}, {"id": 1}]}, True),
        ("items.2.id", {"items": [{"id": 0}, {"id": 1}]}, False),
        ("items.x", {"items": [1]}, False),
        ("items.-1", {"items": [1]}, False),
        ("a.0", {"a": {"0": 1}}, True),
    ],
)
def test_condition_dotted_paths(field: str, output: Any, expected: bool) -> None:
    assert Condition(field=field, value=1).holds(output) is expected


def test_condition_defaults_to_eq_none() -> None:
    cond = Condition(field="a")
    assert cond.op == "eq" and cond.value is None
    assert cond.holds({"a": None})
    assert not cond.holds({})


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"a": 1}, "", (True, {"a": 1})),
        ({"a": 1}, "a", (True, 1)),
        ({"a": [10, 20]}, "a.1", (True, 20)),
        ({"a": [10, 20]}, "a.2", (False, None)),
        ({"a": None}, "a", (True, None)),
        ({"a": None}, "a.b", (False, None)),
        ("scalar", "a", (False, None)),
        (None, "a", (False, None)),
    ],
)
def test_lookup(data: Any, path: str, expected: tuple[bool, Any]) -> None:
    assert lookup(data, path) == expected


def test_condition_rejects_unknown_op() -> None:
    with pytest.raises(ValidationError):
        Condition.model_validate({"field": "a", "op": "regex"})


# -- targets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, ["end:completed"]),
        ("a", ["a"]),
        ("end:rejected", ["end:rejected"]),
        (["a", "b"], ["a", "b"]),
        ([], []),
    ],
)
def test_targets(target: Any, expected: list[str]) -> None:
    assert targets(target) == expected


def test_targets_returns_a_copy() -> None:
    original = ["a", "b"]
    out = targets(original)
    out.append("c")
    assert original == ["a", "b"]

"""The planner's choice of a starting rung, as a plain table: the decider and the figures on a request."""

from __future__ import annotations

from typing import Any

import pytest

from calmrun.errors import ConfigError
from calmrun.workflow.decider import choose_rung, decide
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequested

WF = parse_workflow(
    {
        "name": "wf",
        "steps": [
            {
                "name": "s",
                "agent": "a",
                "models": ["cheap", "mid", "dear"],
                "choose": {"cheapest_meeting": {"success_rate": 0.9, "min_attempts": 10}},
            }
        ],
    }
)


def fig(attempts: int, accepted: int) -> dict[str, Any]:
    return {"attempts": attempts, "accepted": accepted}


@pytest.mark.parametrize(
    ("figures", "rung", "why"),
    [
        ({}, 0, "cheap: 0 attempts in the window, fewer than 10"),
        ({"cheap": fig(10, 9)}, 0, "cheap: success rate 0.900 over 10 attempts meets 0.9"),
        ({"cheap": fig(10, 8)}, 1, "mid: 0 attempts in the window, fewer than 10"),
        ({"cheap": fig(50, 35), "mid": fig(20, 19)}, 1, "mid: success rate 0.950 over 20 attempts meets 0.9"),
        ({"cheap": fig(50, 35), "mid": fig(20, 10), "dear": fig(12, 12)}, 2, "dear: success rate 1.000"),
        (
            {"cheap": fig(50, 35), "mid": fig(20, 10), "dear": fig(12, 6)},
            0,
            "no alias meets success rate 0.9: the ladder from its first rung",
        ),
    ],
)
def test_cheapest_alias_meeting_the_target(figures: dict[str, Any], rung: int, why: str) -> None:
    got_rung, got_why = choose_rung(WF.step("s"), figures)
    assert got_rung == rung and got_why.startswith(why)


def test_the_request_carries_the_figures_and_the_run_starts_on_the_chosen_rung() -> None:
    stats = {"s": {"cheap": fig(50, 35), "mid": fig(20, 19)}}
    d = decide(WF, None, RunRequested("r1", "wf", {}, 1_000, model_stats=stats))
    assert d.state is not None and d.state.start_rungs == {"s": 1}
    assert d.state.steps["s"].model == "mid" and d.state.steps["s"].model_index == 1
    [chosen] = [e for e in d.events if e.type == "step.model_chosen"]
    assert chosen.data["model"] == "mid" and chosen.data["figures"] == stats["s"]
    assert next(e for e in d.events if e.type == "run.requested").data["model_stats"] == stats
    [task] = d.tasks
    assert task.model == "mid"


def test_choose_needs_a_ladder() -> None:
    with pytest.raises(ConfigError, match="choose picks a rung of `models`"):
        parse_workflow(
            {
                "name": "wf",
                "steps": [
                    {
                        "name": "s",
                        "agent": "a",
                        "model": "x",
                        "choose": {"cheapest_meeting": {"success_rate": 1}},
                    }
                ],
            }
        )

"""The ``fault`` marker's bound, enforced: the tests marked ``fault`` stay few and short together.

They restart brokers, kill -9 workers and cut links; each takes tens of seconds to minutes, and CI runs them
all (``make test``). A run fails when:

- more than :data:`MAX_FAULT_TESTS` of the tests it selected are marked ``fault`` (checked once collected,
  before any test runs);
- the tests marked ``fault`` took more than :data:`FAULT_BUDGET_S` together: the setup, call and teardown
  durations pytest reports for them, summed (a session fixture such as the fault tests' cluster counts
  where it is set up and torn down).

Either failure names its figures and this file. A run that selects part of them is held to the same bound:
if a part is over it, so is the whole. Nothing else changes: a run under the bound ends as it would have.
"""

from __future__ import annotations

from typing import Any

import pytest

MAX_FAULT_TESTS = 30
"""26 tests were marked ``fault`` on 2026-12-05 (``pytest -m fault --collect-only -q``); a new one replaces
or shortens another, or this bound is raised with its reason."""
FAULT_BUDGET_S = 15 * 60.0
"""What the issue that brought the fault tests promised (issue 27: "within 15 minutes on this 2-core
machine"); they took about 9 minutes in CI."""


class FaultBound:
    """The pytest plugin (registered by ``tests/conftest.py``)."""

    def __init__(self, max_count: int = MAX_FAULT_TESTS, budget_s: float = FAULT_BUDGET_S) -> None:
        self.max_count, self.budget_s = max_count, budget_s
        self.durations: dict[str, float] = {}
        self.failure: str | None = None

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        marked = [item.nodeid for item in session.items if item.get_closest_marker("fault")]
        if len(marked) > self.max_count:
            raise pytest.UsageError(
                f"fault bound: {len(marked)} selected tests are marked `fault`, more than the bound of "
                f"{self.max_count} (tests/fault_bound.py, MAX_FAULT_TESTS): shorten or merge fault tests, "
                "or raise the bound with its reason"
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "fault" in report.keywords:
            self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        total = sum(self.durations.values())
        if total <= self.budget_s:
            return
        slowest = sorted(self.durations.items(), key=lambda kv: -kv[1])[:5]
        self.failure = (
            f"fault bound: the {len(self.durations)} tests marked `fault` took {total:.1f} s together "
            f"(setup, call and teardown), over the budget of {self.budget_s:g} s (tests/fault_bound.py, "
            "FAULT_BUDGET_S). The slowest: " + ", ".join(f"{nodeid} {s:.1f} s" for nodeid, s in slowest)
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.failure:
            terminalreporter.section("fault bound", sep="=", red=True, bold=True)
            terminalreporter.line(self.failure, red=True)

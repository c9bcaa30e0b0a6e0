"""The fault scenarios' bound, enforced: the ``fault`` tests under ``tests/faults/`` stay few and short.

They restart brokers, kill -9 workers and cut links on the three-broker cluster; each takes tens of seconds
to minutes, and CI runs them all (``make test``). Issue 27 asked that they run "within 15 minutes on this
2-core machine (bounded in count and time)". A run fails when:

- more than :data:`MAX_FAULT_TESTS` of the tests it selected there are marked ``fault`` (checked once
  collected, before any test runs);
- those tests took more than :data:`FAULT_BUDGET_S` together: the setup, call and teardown durations pytest
  reports for them, summed (a session fixture such as the fault tests' cluster counts where it is set up
  and torn down).

Fault tests elsewhere (a worker killed in ``tests/streams/``, faust's restarts) are marked too, so that
``-m "not fault"`` leaves them out, but are not held to this budget: they are the suite's, not the cluster
scenarios'. Either failure names its figures and this file. A run that selects part of them is held to the
same bound: if a part is over it, so is the whole. A run under the bound ends as it would have.
"""

from __future__ import annotations

from typing import Any

import pytest

MAX_FAULT_TESTS = 16
"""13 tests under tests/faults/ were marked ``fault`` on 2026-12-05 (``pytest -m fault --collect-only -q
tests/faults``); a new one replaces or shortens another, or this bound is raised with its reason."""
UNDER = "tests/faults/"
"""The scenarios held to the bound: tests whose node ID starts with this."""
FAULT_BUDGET_S = 15 * 60.0
"""What the issue that brought the fault tests promised (issue 27: "within 15 minutes on this 2-core
machine"); they took about 9 minutes in CI."""


class FaultBound:
    """The pytest plugin (registered by ``tests/conftest.py``)."""

    def __init__(
        self, max_count: int = MAX_FAULT_TESTS, budget_s: float = FAULT_BUDGET_S, under: str = UNDER
    ) -> None:
        self.max_count, self.budget_s, self.under = max_count, budget_s, under
        self.durations: dict[str, float] = {}
        self.failure: str | None = None

    @property
    def _where(self) -> str:
        return f" under {self.under}" if self.under else ""

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        marked = [
            item.nodeid
            for item in session.items
            if item.get_closest_marker("fault") and item.nodeid.startswith(self.under)
        ]
        if len(marked) > self.max_count:
            raise pytest.UsageError(
                f"fault bound: {len(marked)} selected tests{self._where} are marked `fault`, more than "
                f"the bound of {self.max_count} (tests/fault_bound.py, MAX_FAULT_TESTS): shorten or merge "
                "fault tests, or raise the bound with its reason"
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "fault" in report.keywords and report.nodeid.startswith(self.under):
            self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        total = sum(self.durations.values())
        if total <= self.budget_s:
            return
        slowest = sorted(self.durations.items(), key=lambda kv: -kv[1])[:5]
        self.failure = (
            f"fault bound: the {len(self.durations)} tests marked `fault`{self._where} took "
            f"{total:.1f} s together (setup, call and teardown), over the budget of {self.budget_s:g} s "
            "(tests/fault_bound.py, FAULT_BUDGET_S). The slowest: "
            + ", ".join(f"{nodeid} {s:.1f} s" for nodeid, s in slowest)
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.failure:
            terminalreporter.section("fault bound", sep="=", red=True, bold=True)
            terminalreporter.line(self.failure, red=True)

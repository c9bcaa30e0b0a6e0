"""The fault marker's bound (``tests/fault_bound.py``): a run fails, naming its figures, when the tests marked
``fault`` are too many or too slow together, and ends as it would have otherwise."""

from __future__ import annotations

import pytest

from tests.fault_bound import FaultBound

pytest_plugins = ["pytester"]

TESTS = """
import time
import pytest

@pytest.mark.fault
def test_slow_fault():
    time.sleep(0.3)

@pytest.mark.fault
def test_other_fault():
    pass

def test_plain():
    time.sleep(0.3)
"""


def run(pytester: pytest.Pytester, bound: FaultBound, *args: str) -> pytest.RunResult:
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "markers =\n    fault: slow fault-injection tests\n"
    )
    pytester.makepyfile(test_faults=TESTS)
    return pytester.runpytest_inprocess(*args, plugins=[bound])


def test_a_run_within_the_bound_ends_as_it_would_have(pytester: pytest.Pytester) -> None:
    result = run(pytester, FaultBound(max_count=2, budget_s=60, under=""))
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.OK
    assert "fault bound" not in result.stdout.str()


def test_fault_tests_over_the_time_budget_fail_the_run_with_their_figures(pytester: pytest.Pytester) -> None:
    result = run(pytester, FaultBound(max_count=2, budget_s=0.2, under=""))
    result.assert_outcomes(passed=3)  # every test passed; the run fails on the bound alone
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*fault bound: the 2 tests marked `fault` took * s together (setup, call and teardown), "
            "over the budget of 0.2 s*The slowest: test_faults.py::test_slow_fault *"
        ]
    )
    assert "test_plain" not in result.stdout.str().split("fault bound:")[1]  # only the fault tests count


def test_too_many_fault_tests_fail_before_any_runs(pytester: pytest.Pytester) -> None:
    result = run(pytester, FaultBound(max_count=1, budget_s=60, under=""))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*fault bound: 2 selected tests are marked `fault`, more than the bound of 1 (tests/fault_bound.py*"]
    )
    result.assert_outcomes()  # nothing ran


def test_a_run_that_deselects_them_is_not_held_to_their_count(pytester: pytest.Pytester) -> None:
    result = run(pytester, FaultBound(max_count=1, budget_s=0.2, under=""), "-m", "not fault")
    result.assert_outcomes(passed=1, deselected=2)
    assert result.ret == pytest.ExitCode.OK


def test_fault_tests_outside_the_scenarios_folder_are_not_held_to_it(pytester: pytest.Pytester) -> None:
    result = run(pytester, FaultBound(max_count=1, budget_s=0.2, under="tests/faults/"))
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.OK

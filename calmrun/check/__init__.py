"""Checks over what calmrun has written: one history per run (``history``)."""

from calmrun.check.invariants import HistoryReport, Rule, Violation, check_history, check_run

__all__ = ["HistoryReport", "Rule", "Violation", "check_history", "check_run"]

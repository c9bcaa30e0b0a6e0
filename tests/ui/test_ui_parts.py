"""The operator page's parts without a browser: access, the index's queries, redaction, safe previews."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from calmrun.errors import UiAccessError
from calmrun.settings import UiSettings, UiUser
from calmrun.ui.access import LOCAL, Access, User, is_loopback
from calmrun.ui.index import RunIndex, RunQuery, event_row
from calmrun.ui.views import REDACTED, attempts, family, preview, run_view
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.events import RunEvent, StepCost, StepTask
from calmrun.workflow.state import RunState, StepState

ROOT = Path(__file__).resolve().parents[2]


def test_off_loopback_the_page_refuses_to_start_without_authentication() -> None:
    with pytest.raises(UiAccessError, match="needs authentication"):
        Access(UiSettings()).check_host("0.0.0.0")
    Access(UiSettings()).check_host("127.0.0.1")
    Access(UiSettings()).check_host("localhost")
    Access(UiSettings(), token="t").check_host("0.0.0.0")
    Access(UiSettings(trusted_header="X-Forwarded-User")).check_host("0.0.0.0")
    assert is_loopback("::1") and not is_loopback("10.1.2.3")


def test_tokens_and_the_trusted_header_name_the_user_and_role() -> None:
    ui = UiSettings(
        users={"ann": UiUser(token="a-secret", role="operator"), "vic": UiUser(token="v-secret")},  # type: ignore[arg-type]
        trusted_header="X-Forwarded-User",
        header_roles={"olga": "operator"},
    )
    access = Access(ui, token="cli-token")
    assert access.identify("a-secret", {}) == User("ann", "operator")
    assert access.identify("v-secret", {}) == User("vic", "viewer")
    assert access.identify("cli-token", {}) == User("operator", "operator")
    assert access.identify("wrong", {}) is None
    assert access.identify(None, {}) is None
    assert access.identify(None, {"x-forwarded-user": "olga"}) == User("olga", "operator")
    assert access.identify(None, {"x-forwarded-user": "someone"}) == User("someone", "viewer")
    assert Access(UiSettings()).identify(None, {}) == LOCAL  # loopback without authentication


def _state(run_id: str, status: str = "completed", **kw: object) -> RunState:
    return RunState.model_validate(
        {
            "run_id": run_id,
            "workflow": kw.get("workflow", "triage"),
            "version": "1",
            "tenant": kw.get("tenant", "acme"),
            "status": status,
            "created_ms": kw.get("created_ms", 1000),
            "spent_usd": kw.get("spent_usd", Decimal("0.5")),
            "input": {"secret": "card 4111"},
            "steps": {"a": StepState(status="succeeded", attempt=1, output={"x": 1}).model_dump()},
        }
    )


def _event(run_id: str, seq: int, type: str, at: int, step: str | None = None, **kw: object) -> RunEvent:
    return RunEvent.model_validate(
        {"run_id": run_id, "seq": seq, "type": type, "at_ms": at, "workflow": "triage", "step": step, **kw}
    )


def test_index_filters_searches_counts_and_keeps_each_event_once(tmp_path: Path) -> None:
    idx = RunIndex(tmp_path / "ui.sqlite")
    states = [
        (f"r-{i}", _state(f"r-{i}", "completed" if i % 3 else "quarantined", created_ms=i)) for i in range(30)
    ]
    idx.apply(states, [], [])
    idx.apply(
        [("r-5", _state("r-5", "running", created_ms=5)), ("r-6", None)], [], []
    )  # newer state, tombstone
    page = idx.runs(RunQuery())
    assert page.total == 29 and page.rows[0]["run_id"] == "r-29"
    assert page.counts == {"completed": 19, "quarantined": 9, "running": 1}
    assert idx.runs(RunQuery(status="running")).total == 1
    assert [r["run_id"] for r in idx.runs(RunQuery(search="r-2", limit=3)).rows] == ["r-29", "r-28", "r-27"]
    assert idx.runs(RunQuery(search="%")).total == 0  # LIKE wildcards are escaped
    assert idx.runs(RunQuery(since_ms=10, until_ms=20)).total == 10
    codec = RecordCodec(wire_models())
    ev = event_row(codec, codec.encode(_event("r-1", 1, "run.requested", 1)))
    cost = StepCost(tokens_in=3, tokens_out=2, requests=1, cost_usd=Decimal("0.25"))
    done = _event("r-1", 2, "step.succeeded", 2, step="a", attempt=1, cost=cost)
    ignored = _event("r-1", -1, "input.ignored", 2)
    rows = [ev, ev, *(event_row(codec, codec.encode(e)) for e in (done, done, ignored))]
    idx.apply([], rows, [])  # re-sent copies; a logged-only line
    assert [e.seq for e in idx.events("r-1")] == [1, 2]
    assert idx.step_costs() == [
        {"workflow": "triage", "step": "a", "attempts": 1, "tokens": 5, "calls": 1, "usd": "0.25"}
    ]
    assert idx.choices()["status"] == ["completed", "quarantined", "running"]
    assert idx.state("r-5") is not None and idx.state("r-5").status == "running"  # type: ignore[union-attr]
    assert idx.sizes()["runs"] == 29


def test_viewers_get_payloads_redacted_but_causes_kept() -> None:
    st = _state("r", "quarantined")
    st = st.model_copy(update={"error_type": "ConnectionError", "error": "refused"})
    events = [
        _event("r", 1, "run.requested", 1, data={"input": {"secret": "card 4111"}}),
        _event("r", 2, "step.scheduled", 1, step="a", attempt=1, data={"agent": "x", "model": "fast"}),
        _event(
            "r",
            3,
            "step.succeeded",
            9,
            step="a",
            attempt=1,
            data={"kind": "run", "output": {"x": "card 4111"}},
            cost=StepCost(latency_ms=5, queue_wait_ms=3, tokens_in=7, tokens_out=2, cost_usd=Decimal("0.1")),
        ),
    ]
    dead = [{"value": b"card 4111", "headers": "{}", "reason": "quarantined", "error": "refused"}]
    view = run_view(st, events, dead, redact=True)
    text = str(view)
    assert "card 4111" not in text and REDACTED in text
    assert view["state"]["error"] == "refused" and view["dead_letters"][0]["error"] == "refused"
    assert "card 4111" in str(run_view(st, events, dead, redact=False))
    (a,) = attempts(events)
    assert (a["scheduled_ms"], a["start_ms"], a["end_ms"], a["wait_ms"], a["model"]) == (
        1,
        4.0,
        9,
        3.0,
        "fast",
    )


def test_payload_previews_are_safe_for_any_bytes() -> None:
    codec = RecordCodec(wire_models())
    assert preview(None) == "(no value)"
    assert preview('{"ok": "ünïcode"}'.encode()) == '{"ok": "ünïcode"}'
    binary = bytes(range(256))
    out = preview(binary, codec)
    assert out.startswith("256 bytes, not UTF-8 text") and "00 01 02" in out
    assert preview(b"\xc3\x01garbage-not-avro", codec).startswith("18 bytes, not UTF-8")
    task = StepTask(
        run_id="r", workflow="w", version="1", step="s", attempt=1, agent="a", issued_ms=1, timeout_s=1
    )
    assert '"step": "s"' in preview(codec.encode(task), codec)
    assert "\x00" not in preview(b"a\x00b", codec)
    rec = DlqRecord(
        reason="poison", error_type="DecodeError", error="x", source_topic="t", source_partition=0,
        source_offset=1, value=b"\xff\xfe", at_ms=1,
    )  # fmt: skip
    assert preview(rec.value, codec).startswith("2 bytes")


def test_calmrun_help_does_not_import_the_page() -> None:
    code = "import sys, calmrun.cli; print(any(m.startswith('calmrun.ui') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_a_runs_view_links_its_parent_and_its_children_with_their_status() -> None:
    parent = _state("p", "running", spent_usd=Decimal("0.7"))
    child = _state("p.fraud", "completed", workflow="fraud", spent_usd=Decimal("0.2"))
    child = child.model_copy(update={"parent": {"run_id": "p", "workflow": "triage", "step": "fraud"}})
    events = [
        _event("p", 1, "run.requested", 1),
        _event(
            "p",
            2,
            "step.child_started",
            2,
            step="fraud",
            attempt=1,
            data={"child_run_id": "p.fraud", "workflow": "fraud"},
        ),
        _event(
            "p",
            3,
            "step.child_started",
            3,
            step="fraud",
            attempt=2,
            data={"child_run_id": "p.fraud.2", "workflow": "fraud"},
        ),
        _event(
            "p",
            4,
            "step.child_finished",
            4,
            step="fraud",
            attempt=2,
            data={"child_run_id": "p.fraud.2", "status": "quarantined"},
        ),
        _event(
            "p",
            5,
            "step.child_started",
            5,
            step="fraud",
            attempt=3,
            data={"child_run_id": "p.fraud.3", "workflow": "fraud"},
        ),
    ]
    known = {"p": parent, "p.fraud": child}
    fam = family(parent, events, known.get)
    assert fam["parent"] is None
    assert [(c["run_id"], c["step"], c["status"], c["spent_usd"]) for c in fam["children"]] == [
        ("p.fraud", "fraud", "completed", "0.2"),  # the child's own state, from the index
        ("p.fraud.2", "fraud", "quarantined", None),  # not in the index: the parent's child_finished
        ("p.fraud.3", "fraud", "started", None),  # neither yet
    ]
    up = family(child, [], known.get)
    assert up == {
        "parent": {"run_id": "p", "workflow": "triage", "step": "fraud", "status": "running"},
        "children": [],
    }
    assert family(None, [], known.get) == {"parent": None, "children": []}

"""The page's local index: a SQLite cache of the state, events and dead-letter topics, for queries.

It is never a source of truth: it is deleted and rebuilt from the topics at every start and kept current
by tailing them (``tail.py``). A run's row is its latest state record; events are kept once per
``(run_id, seq)`` as their Avro bytes (a copy re-sent after a crash is dropped, ``seq < 0`` lines are not
kept) and decoded when a run's page asks for them; a dead letter is kept per ``(topic, partition, offset)``
with its original bytes, for the preview and the redrive. Per-step cost sums and the filter menus' values
are kept up to date as rows arrive, so no view scans every event.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from calmrun.errors import DecodeError
from calmrun.wire.codec import NAMESPACE, RecordCodec, wire_models
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.events import RunEvent
from calmrun.workflow.state import RunState

EventRow = tuple[str, int, str, int, str | None, int | None, str, dict[str, Any] | None, bytes]
"""(run_id, seq, type, at_ms, step, attempt, workflow, cost as decoded Avro or None, the record's bytes)"""

_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, version TEXT NOT NULL, tenant TEXT NOT NULL,
    status TEXT NOT NULL, outcome TEXT, error_type TEXT, error TEXT, created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL, seq INTEGER NOT NULL, spent REAL NOT NULL, spent_usd TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX runs_created ON runs (created_ms DESC, run_id);
CREATE INDEX runs_status ON runs (status, created_ms DESC, run_id);
CREATE INDEX runs_workflow ON runs (workflow, created_ms DESC, run_id);
CREATE INDEX runs_spent ON runs (spent DESC);
CREATE TABLE events (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, at_ms INTEGER NOT NULL,
    step TEXT, attempt INTEGER, body BLOB NOT NULL, PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE step_costs (
    workflow TEXT NOT NULL, step TEXT NOT NULL, attempts INTEGER NOT NULL, tokens INTEGER NOT NULL,
    calls INTEGER NOT NULL, usd TEXT NOT NULL, PRIMARY KEY (workflow, step)
) WITHOUT ROWID;
CREATE TABLE choices (name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (name, value)) WITHOUT ROWID;
CREATE TABLE dlq (
    topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL, workflow TEXT NOT NULL,
    reason TEXT NOT NULL, error_type TEXT NOT NULL, error TEXT NOT NULL, run_id TEXT, step TEXT,
    attempt INTEGER NOT NULL, at_ms INTEGER NOT NULL, source TEXT NOT NULL, value BLOB,
    headers TEXT NOT NULL, PRIMARY KEY (topic, part, off)
);
CREATE INDEX dlq_run ON dlq (run_id);
"""

FILTERS = ("workflow", "version", "status", "outcome", "tenant")


@dataclass(frozen=True)
class RunQuery:
    """A query of the runs list: equality filters, a run-ID search, a creation-time range, a page."""

    workflow: str | None = None
    version: str | None = None
    status: str | None = None
    outcome: str | None = None
    tenant: str | None = None
    search: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 100
    offset: int = 0


@dataclass
class RunPage:
    rows: list[dict[str, Any]]
    total: int
    counts: dict[str, int] = field(default_factory=dict)


class RunIndex:
    """The SQLite index. One instance per page process; methods run on the caller's thread (quick queries).

    Args:
        path: the database file; it is deleted and created anew (``":memory:"`` keeps it in memory).
    """

    def __init__(self, path: Path | str, codec: RecordCodec | None = None) -> None:
        if str(path) != ":memory:":
            p = Path(path)
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(p) + suffix).unlink(missing_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(_SCHEMA)
        self.codec = codec or RecordCodec(wire_models())  # events are stored as read (any framing)

    def close(self) -> None:
        self.db.close()

    # -- writing (from the tail) ------------------------------------------------------------------

    def apply(
        self,
        states: Iterable[tuple[str, RunState | None]],
        events: Iterable[EventRow],
        dead: Iterable[tuple[str, int, int, str, DlqRecord]],
    ) -> None:
        """Apply one batch read from the topics, in one transaction.

        Args:
            states: (run ID, latest state) in offset order; None is a tombstone (the run is forgotten).
            events: audit events as rows; the first copy of each (run, seq >= 0) is kept.
            dead: (topic, partition, offset, workflow, record) of the dead-letter topics.
        """
        db = self.db
        db.execute("BEGIN")
        try:
            for run_id, st in states:
                if st is None:
                    db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        st.run_id,
                        st.workflow,
                        st.version,
                        st.tenant,
                        st.status,
                        st.outcome,
                        st.error_type,
                        st.error,
                        st.created_ms,
                        st.clock_ms,
                        st.seq,
                        float(st.spent_usd),
                        str(st.spent_usd),
                        st.model_dump_json(),
                    ),
                )
                db.executemany(
                    "INSERT OR IGNORE INTO choices VALUES (?, ?)",
                    [(n, v) for n, v in zip(FILTERS, _choice_values(st), strict=True) if v],
                )
            for run_id, seq, type_, at_ms, step, attempt, workflow, cost, body in events:
                if seq < 0:
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?)",
                    (run_id, seq, type_, at_ms, step, attempt, body),
                )
                if cur.rowcount == 1 and cost and step and seq > 0 and type_ in _ATTEMPTS:
                    self._add_step_cost(workflow, step, cost)
            db.executemany(
                "INSERT OR IGNORE INTO dlq VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    (
                        topic,
                        part,
                        off,
                        workflow,
                        r.reason,
                        r.error_type,
                        r.error,
                        r.run_id,
                        r.step,
                        r.attempt,
                        r.at_ms,
                        f"{r.source_topic}[{r.source_partition}]@{r.source_offset}",
                        r.value,
                        json.dumps({k: v.decode(errors="replace") for k, v in r.headers.items()}),
                    )
                    for topic, part, off, workflow, r in dead
                ),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- reading ------------------------------------------------------------------------------------

    def runs(self, q: RunQuery) -> RunPage:
        """Runs matching ``q``, newest first, with the total and the counts by status of the match."""
        where, args = [], []
        for name in FILTERS:
            value = getattr(q, name)
            if value:
                where.append(f"{name} = ?")
                args.append(value)
        if q.search:
            where.append("run_id LIKE ? ESCAPE '\\'")
            args.append("%" + q.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if q.since_ms is not None:
            where.append("created_ms >= ?")
            args.append(q.since_ms)
        if q.until_ms is not None:
            where.append("created_ms < ?")
            args.append(q.until_ms)
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        rows = self.db.execute(
            "SELECT run_id, workflow, version, tenant, status, outcome, error_type, error, created_ms, "
            f"updated_ms, seq, spent_usd FROM runs {cond} ORDER BY created_ms DESC, run_id LIMIT ? OFFSET ?",
            [*args, max(1, min(q.limit, 1000)), max(0, q.offset)],
        ).fetchall()
        counts = {
            r[0]: r[1]
            for r in self.db.execute(f"SELECT status, count(*) FROM runs {cond} GROUP BY status", args)
        }
        return RunPage([dict(r) for r in rows], sum(counts.values()), counts)

    def choices(self) -> dict[str, list[str]]:
        """The values each filter can take (for the filter menus): every value seen since the start."""
        out: dict[str, list[str]] = {name: [] for name in FILTERS}
        for name, value in self.db.execute("SELECT name, value FROM choices ORDER BY name, value"):
            out[name].append(value)
        return out

    def _add_step_cost(self, workflow: str, step: str, cost: dict[str, Any]) -> None:
        row = self.db.execute(
            "SELECT attempts, tokens, calls, usd FROM step_costs WHERE workflow = ? AND step = ?",
            (workflow, step),
        ).fetchone()
        attempts, tokens, calls, usd = row if row else (0, 0, 0, "0")
        self.db.execute(
            "INSERT OR REPLACE INTO step_costs VALUES (?,?,?,?,?,?)",
            (
                workflow,
                step,
                attempts + 1,
                tokens + int(cost.get("tokens_in") or 0) + int(cost.get("tokens_out") or 0),
                calls + int(cost.get("requests") or 0) + int(cost.get("api_calls") or 0),
                str(Decimal(usd) + Decimal(str(cost.get("cost_usd") or 0))),
            ),
        )

    def state(self, run_id: str) -> RunState | None:
        row = self.db.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return RunState.model_validate_json(row[0]) if row else None

    def events(self, run_id: str) -> list[RunEvent]:
        """The run's applied events in seq order (each seq once)."""
        return [
            self.codec.decode_as(r[0], RunEvent)
            for r in self.db.execute("SELECT body FROM events WHERE run_id = ? ORDER BY seq", (run_id,))
        ]

    def dead_letters(
        self, workflow: str | None = None, run_id: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Dead letters, newest first, each with its run's current status (``run_status``) when known."""
        where, args = [], []
        if workflow:
            where.append("d.workflow = ?")
            args.append(workflow)
        if run_id:
            where.append("d.run_id = ?")
            args.append(run_id)
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        return [
            dict(r)
            for r in self.db.execute(
                "SELECT d.*, r.status AS run_status FROM dlq d LEFT JOIN runs r ON r.run_id = d.run_id "
                f"{cond} ORDER BY d.at_ms DESC, d.topic, d.part, d.off LIMIT ?",
                [*args, limit],
            )
        ]

    def dlq_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute("SELECT workflow, count(*) FROM dlq GROUP BY workflow")}

    def top_runs(self, limit: int = 10) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.db.execute(
                "SELECT run_id, workflow, tenant, status, spent_usd FROM runs WHERE spent > 0 "
                "ORDER BY spent DESC, run_id LIMIT ?",
                (limit,),
            )
        ]

    def step_costs(self) -> list[dict[str, Any]]:
        """Per (workflow, step): attempts, tokens, calls and money of the recorded attempts."""
        return [dict(r) for r in self.db.execute("SELECT * FROM step_costs ORDER BY workflow, step")]

    def in_flight(self) -> dict[str, int]:
        """Step attempts the states say are running or waiting for a retry, by status."""
        out: dict[str, int] = {}
        for (state,) in self.db.execute("SELECT state FROM runs WHERE status = 'running'"):
            for st in json.loads(state).get("steps", {}).values():
                if st["status"] in ("scheduled", "retry_wait", "compensating"):
                    out[st["status"]] = out.get(st["status"], 0) + 1
        return out

    def waiting(self, approver: str | None = None, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every step waiting for a person (an approval or a signal), oldest first: the Inbox.

        Args:
            approver: only approvals this name may answer (its ``approvers`` name it, or are empty).
            run_id: only this run's.
        """
        out: list[dict[str, Any]] = []
        sql = "SELECT run_id, state FROM runs WHERE status = 'running' AND state LIKE '%\"waiting\"%'"
        rows = self.db.execute(sql + " AND run_id = ?", (run_id,)) if run_id else self.db.execute(sql)
        for rid, text in rows.fetchall():
            state = json.loads(text)
            for step, st in state.get("steps", {}).items():
                if st["status"] != "waiting":
                    continue
                row = self.db.execute(
                    "SELECT body FROM events WHERE run_id = ? AND type = 'step.waiting' AND step = ? "
                    "ORDER BY seq DESC LIMIT 1",
                    (rid, step),
                ).fetchone()
                data = self.codec.decode_as(row[0], RunEvent).data if row else {}
                kind = str(data.get("kind") or "approval")
                approvers = [str(a) for a in data.get("approvers") or []]
                if approver is not None and (kind != "approval" or (approvers and approver not in approvers)):
                    continue
                out.append(
                    {
                        "run_id": rid,
                        "workflow": state["workflow"],
                        "version": state["version"],
                        "tenant": state.get("tenant", ""),
                        "step": step,
                        "kind": kind,
                        "approvers": approvers,
                        "signal": data.get("signal"),
                        "since_ms": st.get("scheduled_ms") or 0,
                        "due_ms": st.get("due_ms"),
                    }
                )
        out.sort(key=lambda r: (r["since_ms"], r["run_id"], r["step"]))
        return out

    def issued(self) -> dict[tuple[str, str], int]:
        """Attempts issued and not finished (status ``scheduled``), by (workflow, step)."""
        out: dict[tuple[str, str], int] = {}
        for (state,) in self.db.execute("SELECT state FROM runs WHERE status = 'running'"):
            s = json.loads(state)
            for step, st in s.get("steps", {}).items():
                if st["status"] == "scheduled":
                    out[(s["workflow"], step)] = out.get((s["workflow"], step), 0) + 1
        return out

    def sizes(self) -> dict[str, int]:
        """Rows per table and the database's size in bytes."""
        out = {
            t: self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "events", "dlq")
        }
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        size = self.db.execute("PRAGMA page_size").fetchone()[0]
        out["bytes"] = pages * size
        return out


_ATTEMPTS = frozenset({"step.succeeded", "step.failed"})


def _choice_values(st: RunState) -> tuple[str | None, ...]:
    return (st.workflow, st.version, st.status, st.outcome, st.tenant)


_EVENT = f"{NAMESPACE}.RunEvent"


def event_row(codec: RecordCodec, value: bytes) -> EventRow:
    """The index's columns of an encoded event, from fastavro's dict (no pydantic model: rebuilds are bulk).

    Raises:
        DecodeError: not an encoded ``RunEvent``.
    """
    name, raw = codec.read_avro(value)
    if name != _EVENT:
        raise DecodeError(f"expected {_EVENT}, got {name}")
    return (
        raw["run_id"],
        raw["seq"],
        raw["type"],
        raw["at_ms"],
        raw["step"],
        raw["attempt"],
        raw["workflow"],
        raw["cost"],
        value,
    )

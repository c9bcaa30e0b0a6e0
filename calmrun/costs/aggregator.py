"""The cost aggregator: a faust table over ``<prefix>.runs.events`` with totals per dimension and window.

What it holds: per run, workflow, agent, model alias and tenant, the attempts (succeeded, failed), tokens in
and out, model requests, downstream API calls, money (``Decimal``, kept as a string), latency and queue wait,
over all time and in tumbling windows of one minute and one hour (tenants also one day, for budgets).
Buckets are aligned to the epoch and taken from the event's time (``at_ms``), so a replay puts every
attempt in the same bucket; old buckets are deleted after ``costs.retention_s`` (event time).

Exactly once over an at-least-once log. Two kinds of copies reach the aggregator:

* a worker crash re-sends events under the same ``(run_id, seq)``; the first copy is counted (a re-executed
  attempt may report other tokens: the first recorded result is the one the run used). Events are keyed by
  run ID and a run's events are appended in ``seq`` order, so a copy is an event whose ``seq`` is not above
  the highest counted seq of its run. Events with ``seq <= 0`` (``input.ignored``) are logged only.
* after an aggregator crash faust re-delivers events since the last commit, while the table comes back from
  its compacted changelog holding whatever part of their updates was written. Every table value carries
  the source offset it last applied (``off``); an update is applied only above it. The run's own record
  lists the offsets it counted, so a replayed event is counted again exactly when it was counted the
  first time. Every write of one source partition goes to the same changelog partition, in order, so what
  survives a crash is a prefix of the writes and each key's ``off`` tells what it already has.

Table keys (and ``<prefix>.costs.totals`` keys) are JSON arrays ``[dimension, value, window, start_ms,
partition]``: each source partition keeps its own partial sums (a changelog partition has one writer);
readers add the partitions up (``calmrun.costs.totals``). A timer writes changed totals to the compacted
``<prefix>.costs.totals`` and each tenant's current window spend to the compacted ``<prefix>.costs.tenants``
every ``costs.emit_interval_s``; after a restart every recovered key is written once more.

Build the app with :func:`build_app` (nothing happens at import); run it with ``calmrun costs-aggregator``
or ``python -m calmrun.costs.aggregator``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from calmrun.codec import RecordCodec, wire_models
from calmrun.connect import faust_credentials
from calmrun.errors import DecodeError
from calmrun.settings import SecuritySettings, Settings, load_settings
from calmrun.workflow.events import RunEvent

log = logging.getLogger("calmrun.costs")

WINDOW_MS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000, "1d": 86_400_000}
ALL = "all"
DIMENSIONS = ("run", "workflow", "agent", "model", "tenant")
WINDOWS_OF: dict[str, tuple[str, ...]] = {
    "run": (ALL,),
    "workflow": (ALL, "1m", "1h"),
    "agent": (ALL, "1m", "1h"),
    "model": (ALL, "1m", "1h"),
    "tenant": (ALL, "1m", "1h", "1d"),
}
TABLE = "totals"
COST_EVENTS = frozenset({"step.succeeded", "step.failed"})
SCHEDULED = frozenset({"step.scheduled", "step.compensation_scheduled"})
NO_MODEL = "-"

Value = dict[str, Any]


@dataclass(frozen=True)
class CostTopics:
    """Names under one prefix: the aggregator's output topics and its app id (its consumer group)."""

    prefix: str

    @property
    def events(self) -> str:
        return f"{self.prefix}.runs.events"

    @property
    def totals(self) -> str:
        return f"{self.prefix}.costs.totals"

    @property
    def tenants(self) -> str:
        return f"{self.prefix}.costs.tenants"

    def app_id(self, settings: Settings) -> str:
        return settings.costs.app_id or f"{self.prefix}-costs"


def bucket_start(at_ms: int, window: str) -> int:
    """Start of the tumbling ``window`` bucket holding ``at_ms`` (0 for ``all``)."""
    if window == ALL:
        return 0
    size = WINDOW_MS[window]
    return at_ms - at_ms % size


def total_key(dim: str, value: str, window: str, start_ms: int, partition: int) -> str:
    return json.dumps([dim, value, window, start_ms, partition], separators=(",", ":"))


def parse_key(key: str) -> tuple[str, str, str, int, int]:
    dim, value, window, start, partition = json.loads(key)
    return str(dim), str(value), str(window), int(start), int(partition)


def _empty() -> Value:
    return {
        "attempts": 0,
        "succeeded": 0,
        "failed": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "requests": 0,
        "api_calls": 0,
        "cost_usd": "0",
        "latency_ms": 0.0,
        "queue_wait_ms": 0.0,
        "off": -1,
    }


def _add(v: Value, ev: RunEvent) -> None:
    c = ev.cost
    assert c is not None
    v["attempts"] += 1
    v["succeeded" if ev.type == "step.succeeded" else "failed"] += 1
    v["tokens_in"] += c.tokens_in
    v["tokens_out"] += c.tokens_out
    v["requests"] += c.requests
    v["api_calls"] += c.api_calls
    v["cost_usd"] = str(Decimal(v["cost_usd"]) + c.cost_usd)
    v["latency_ms"] += c.latency_ms
    v["queue_wait_ms"] += c.queue_wait_ms


PUBLIC_FIELDS = (
    "attempts",
    "succeeded",
    "failed",
    "tokens_in",
    "tokens_out",
    "requests",
    "api_calls",
    "cost_usd",
    "latency_ms",
    "queue_wait_ms",
)


def public(key: str, v: Value) -> Value:
    """The ``<prefix>.costs.totals`` value of one table entry."""
    dim, value, window, start, partition = parse_key(key)
    out: Value = {"dim": dim, "value": value, "window": window, "start_ms": start, "partition": partition}
    out.update({f: v[f] for f in PUBLIC_FIELDS})
    return out


class CostFold:
    """The aggregator's logic over any mutable mapping (the faust table, or a dict in tests and benches).

    Args:
        table: key -> value; every assignment and deletion is a changelog write in faust.
        retention_ms: window -> how long its buckets are kept (event time).
    """

    def __init__(self, table: MutableMapping[str, Value], retention_ms: dict[str, int]) -> None:
        self.table = table
        self.retention_ms = retention_ms
        self.dirty: set[str] = set()
        self.counted = 0
        self.duplicates = 0
        self._swept: dict[tuple[int, str], int] = {}
        self._tenant_emitted: dict[tuple[str, str, int], int] = {}

    def apply(self, ev: RunEvent, partition: int, offset: int) -> bool:
        """Fold one event read at ``partition``/``offset``; True when its cost was counted now."""
        if ev.seq <= 0:
            return False
        if ev.type in SCHEDULED:
            self._remember_agent(ev, partition)
            return False
        if ev.type not in COST_EVENTS or ev.cost is None:
            return False
        rkey = total_key("run", ev.run_id, ALL, 0, partition)
        rec = self.table.get(rkey) or {**_empty(), "hw": 0, "counted": [], "agents": {}}
        if offset <= rec["off"]:
            counted = offset in rec["counted"]  # a replay: counted iff it was counted the first time
        else:
            counted = ev.seq > rec["hw"]
            if counted:
                _add(rec, ev)
                rec["hw"], rec["off"] = ev.seq, offset
                rec["counted"] = [*rec["counted"], offset]
                self.table[rkey] = rec
                self.dirty.add(rkey)
        if not counted:
            self.duplicates += 1
            return False
        kind = str(ev.data.get("kind", "run"))
        agent = getattr(ev.cost, "agent", None) or rec["agents"].get(f"{kind}:{ev.step}") or f"?{ev.step}"
        for dim, value in (
            ("workflow", ev.workflow),
            ("agent", agent),
            ("model", ev.cost.model or NO_MODEL),
            ("tenant", ev.tenant),
        ):
            for window in WINDOWS_OF[dim]:
                key = total_key(dim, value, window, bucket_start(ev.at_ms, window), partition)
                cur = self.table.get(key)
                if cur is None:
                    cur = _empty()
                elif cur["off"] >= offset:
                    continue  # written before a crash: this key has it already
                _add(cur, ev)
                cur["off"] = offset
                self.table[key] = cur
                self.dirty.add(key)
        self.counted += 1
        self._sweep(partition, ev.at_ms)
        return True

    def _remember_agent(self, ev: RunEvent, partition: int) -> None:
        agent = ev.data.get("agent")
        if not isinstance(agent, str) or ev.step is None:
            return
        kind = "run" if ev.type == "step.scheduled" else "compensate"
        rkey = total_key("run", ev.run_id, ALL, 0, partition)
        rec = self.table.get(rkey) or {**_empty(), "hw": 0, "counted": [], "agents": {}}
        if rec["agents"].get(f"{kind}:{ev.step}") != agent:
            rec["agents"] = {**rec["agents"], f"{kind}:{ev.step}": agent}
            self.table[rkey] = rec

    def _sweep(self, partition: int, at_ms: int) -> None:
        """Delete this partition's buckets older than their retention (once per new bucket)."""
        due: dict[str, int] = {}
        for window, size in WINDOW_MS.items():
            start = at_ms - at_ms % size
            if self._swept.get((partition, window), -1) < start:
                self._swept[(partition, window)] = start
                due[window] = start - self.retention_ms.get(window, 0)
        if not due:
            return
        for key in list(self.table.keys()):
            _, _, window, start, p = parse_key(key)
            if p == partition and window in due and start < due[window]:
                del self.table[key]
                self.dirty.add(key)

    def mark_all_dirty(self) -> None:
        """Re-emit every key (after recovery: the output topics may lag the changelog)."""
        self.dirty.update(self.table.keys())

    def drain(
        self, partitions: Iterable[int] | None = None
    ) -> tuple[list[tuple[str, Value | None]], list[tuple[str, Value]]]:
        """Take the changed keys: (totals records, tenants records), each ``(key, value or None)``.

        Only keys of ``partitions`` are taken when given (the ones this aggregator owns).
        """
        owned = set(partitions) if partitions is not None else None
        totals: list[tuple[str, Value | None]] = []
        latest: dict[tuple[str, str, int], tuple[int, Value]] = {}
        keep: set[str] = set()
        for key in self.dirty:
            dim, value, window, start, p = parse_key(key)
            if owned is not None and p not in owned:
                keep.add(key)
                continue
            v = self.table.get(key)
            totals.append((key, public(key, v) if v is not None else None))
            if dim == "tenant" and window != ALL and v is not None:
                gk = (value, window, p)
                if gk not in latest or latest[gk][0] < start:
                    latest[gk] = (start, v)
        self.dirty = keep
        tenants: list[tuple[str, Value]] = []
        for (tenant, window, p), (start, v) in latest.items():
            if self._tenant_emitted.get((tenant, window, p), -1) > start:
                continue  # a late event for an older bucket: the current one stands
            self._tenant_emitted[(tenant, window, p)] = start
            key = json.dumps([tenant, window, p], separators=(",", ":"))
            tenants.append(
                (
                    key,
                    {
                        "tenant": tenant,
                        "window": window,
                        "start_ms": start,
                        "partition": p,
                        "spent_usd": v["cost_usd"],
                    },
                )
            )
        return totals, tenants


def retention_ms(settings: Settings) -> dict[str, int]:
    return {w: s * 1000 for w, s in settings.costs.retention_s.items()}


def build_app(settings: Settings, *, data_dir: Path | None = None) -> Any:
    """The aggregator as a faust app (not started): one agent over the events topic, one table, one timer.

    Args:
        settings: Kafka (bootstrap, prefix, partitions) and ``costs`` settings.
        data_dir: faust's data directory (default ``costs.data_dir`` or a new temporary directory).

    Returns:
        The ``faust.App``; its consumer group is ``costs.app_id`` (default ``<prefix>-costs``).
    """
    import faust

    k, c = settings.kafka, settings.costs
    topics = CostTopics(k.prefix)
    folder = data_dir or c.data_dir or Path(tempfile.mkdtemp(prefix="calmrun-costs-"))
    app = faust.App(
        topics.app_id(settings),
        broker=[f"kafka://{server}" for server in k.bootstrap.split(",")],
        store="memory://",
        datadir=str(folder),
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        processing_guarantee="at_least_once",
        broker_commit_interval=c.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        broker_session_timeout=c.session_timeout_s,
        broker_heartbeat_interval=c.session_timeout_s / 3,
        producer_linger=0.005,  # batch the changelog writes (faust's default sends each on its own)
        stream_buffer_maxsize=16384,
        **faust_credentials(k),
    )
    codec = RecordCodec(wire_models())
    source = app.topic(topics.events, key_serializer="raw", value_serializer="raw")
    totals_out = app.topic(topics.totals, key_serializer="raw", value_serializer="raw")
    tenants_out = app.topic(topics.tenants, key_serializer="raw", value_serializer="raw")
    table = app.Table(TABLE, partitions=k.partitions, key_type=str)  # values: plain JSON objects
    fold = CostFold(table, retention_ms(settings))

    async def fold_events(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                ev = codec.decode_as(msg.value or b"", RunEvent)
            except DecodeError as exc:
                log.warning(
                    "skipping undecodable event %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc
                )
                continue
            fold.apply(ev, msg.partition, msg.offset)

    app.agent(source, name="fold")(fold_events)

    async def on_recovered() -> None:
        fold.mark_all_dirty()

    table.on_recover(on_recovered)

    async def on_started() -> None:
        # faust throttles a stream once more than 100 table writes wait to be produced (ProducerBuffer
        # .max_messages), draining them one by one; commits still flush everything before committing.
        app.producer.buffer.max_messages = c.producer_buffer

    app.task(on_started)

    async def emit() -> None:
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.events}
        totals, tenants = fold.drain(owned)
        for key, value in totals:
            p = parse_key(key)[4]
            body = json.dumps(value).encode() if value is not None else None
            await totals_out.send(key=key.encode(), value=body, partition=p)
        for key, value in tenants:
            await tenants_out.send(
                key=key.encode(), value=json.dumps(value).encode(), partition=value["partition"]
            )

    app.timer(c.emit_interval_s, name="emit-totals")(emit)
    return app


async def ensure_cost_topics(settings: Settings) -> list[str]:
    """Create the compacted output topics (same partition count as calmrun's); idempotent."""
    from calmrun.streams.topics import create_topics

    topics = CostTopics(settings.kafka.prefix)
    compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "600000"}
    return await create_topics(
        settings.kafka, {topics.totals: compact, topics.tenants: compact, topics.events: {}}, "costs"
    )


class AggregatorProcess:
    """The aggregator in a child process (``python -m calmrun.costs.aggregator``), for demos, benches, tests.

    ``with AggregatorProcess(settings) as agg:``; leaving stops it with SIGTERM (``kill()`` is kill -9).
    """

    def __init__(self, settings: Settings, *, log: Path | None = None, extra: Sequence[str] = ()) -> None:
        self.settings, self.log_path, self.extra = settings, log, list(extra)
        self.proc: Any = None

    def start(self) -> AggregatorProcess:
        import os
        import subprocess

        k = self.settings.kafka
        args = [
            sys.executable,
            "-m",
            "calmrun.costs.aggregator",
            "--bootstrap",
            k.bootstrap,
            "--prefix",
            k.prefix,
            "--partitions",
            str(k.partitions),
            "--commit-interval",
            str(self.settings.costs.commit_interval_s),
            "--loglevel",
            "warning",
            *self.extra,
        ]
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            # the child authenticates as this process does; an env:/file: secret stays a reference
            "CALMRUN_KAFKA__SECURITY": security_json(k.security),
        }
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        if out is not subprocess.DEVNULL:
            out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no commit, no flush (the crash a restart must survive)."""
        import signal

        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, wait_s: float = 30.0) -> None:
        import signal
        import subprocess

        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> AggregatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def security_json(sec: SecuritySettings) -> str:
    """``kafka.security`` as JSON for a child's ``CALMRUN_KAFKA__SECURITY`` (secrets as configured)."""
    data = sec.model_dump(mode="json")
    if sec.sasl.password is not None:
        data["sasl"]["password"] = sec.sasl.password.get_secret_value()
    if sec.tls.key_password is not None:
        data["tls"]["key_password"] = sec.tls.key_password.get_secret_value()
    return json.dumps(data)


def run_aggregator(settings: Settings, *, loglevel: str = "info", data_dir: Path | None = None) -> None:
    """Create the topics, then run the aggregator in this process until SIGTERM/SIGINT (blocks)."""
    import faust

    asyncio.run(ensure_cost_topics(settings))
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = build_app(settings, data_dir=data_dir)
    worker = faust.Worker(app, loglevel=loglevel, redirect_stdouts=False, stdout=sys.stdout)
    worker.execute_from_commandline()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m calmrun.costs.aggregator [--config F] [--bootstrap B] [--prefix P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m calmrun.costs.aggregator", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", type=Path)
    parser.add_argument("--bootstrap")
    parser.add_argument("--prefix")
    parser.add_argument("--partitions", type=int)
    parser.add_argument("--commit-interval", type=float, help="seconds between offset commits")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    kafka = {
        k: v
        for k, v in {
            "bootstrap": args.bootstrap,
            "prefix": args.prefix,
            "partitions": args.partitions,
        }.items()
        if v is not None
    }
    costs = {"commit_interval_s": args.commit_interval} if args.commit_interval else {}
    settings = load_settings(args.config, kafka=kafka, costs=costs)
    run_aggregator(settings, loglevel=args.loglevel, data_dir=args.data_dir)


if __name__ == "__main__":
    main()

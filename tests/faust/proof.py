"""A minimal faust-streaming app proving the stack: forward records and count them in a changelogged table.

One agent reads ``<prefix>.proof.in`` and forwards each record to ``<prefix>.proof.out`` under the same key
(a run id), adding the running count of records seen for that key. The count lives in a faust Table with
the in-memory store, so after a restart it can only come back from the table's compacted changelog topic.

Run a worker in its own process (nothing happens at import time)::

    python -m tests.faust.proof worker --bootstrap 127.0.0.1:9092 --prefix demo --data-dir /tmp/w

Input values are JSON objects (a ``seq`` field is echoed back); output values are JSON objects with
``key``, ``seq``, ``count``, ``partition``, ``offset`` (of the input record) and ``pid`` (of the worker).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

TABLE_NAME = "counts"


@dataclass(frozen=True)
class ProofNames:
    """Names derived from a topic prefix.

    Attributes:
        app_id: the faust app id, also the consumer group id.
        in_topic: the topic the agent reads.
        out_topic: the topic the agent writes.
        changelog_topic: the changelog topic faust creates for the counts table.
    """

    app_id: str
    in_topic: str
    out_topic: str
    changelog_topic: str

    @classmethod
    def for_prefix(cls, prefix: str) -> ProofNames:
        """Derive every name from ``prefix``."""
        app_id = f"{prefix}-proof"
        return cls(
            app_id=app_id,
            in_topic=f"{prefix}.proof.in",
            out_topic=f"{prefix}.proof.out",
            changelog_topic=f"{app_id}-{TABLE_NAME}-changelog",
        )


def build_app(
    *,
    bootstrap: str,
    prefix: str,
    data_dir: Path,
    partitions: int = 4,
    commit_interval: float = 2.8,
    guarantee: str = "at_least_once",
    session_timeout: float | None = None,
    settings: Mapping[str, Any] | None = None,
    changelog_configs: Mapping[str, Any] | None = None,
) -> faust.App:
    """Build the proof app: one forwarding agent and one counts table.

    Args:
        bootstrap: Kafka bootstrap servers, ``host:port[,host:port]``.
        prefix: topic prefix; the app id and all topic names derive from it.
        data_dir: faust's data directory for this worker.
        partitions: partitions of the input, output and changelog topics.
        commit_interval: seconds between offset commits (faust's ``broker_commit_interval``).
        guarantee: faust's ``processing_guarantee``, ``at_least_once`` or ``exactly_once``.
        session_timeout: consumer group session timeout in seconds (heartbeats every third of it);
            faust's default (60 s) delays the rebalance after a worker is killed by as much.
        settings: further faust settings (they win over the arguments above).
        changelog_configs: extra topic configs for the table's changelog, e.g. ``{"segment.ms": 5000}``:
            compaction never touches the active segment, so recovery reads all of it.

    Returns:
        The faust app, not started.
    """
    names = ProofNames.for_prefix(prefix)
    config: dict[str, Any] = {
        "broker": [f"kafka://{server}" for server in bootstrap.split(",")],
        "store": "memory://",
        "datadir": str(data_dir),
        "topic_partitions": partitions,
        "topic_replication_factor": 1,
        "broker_commit_interval": commit_interval,
        "processing_guarantee": guarantee,
        "consumer_auto_offset_reset": "earliest",
        "web_enabled": False,
    }
    if session_timeout is not None:
        config["broker_session_timeout"] = session_timeout
        config["broker_heartbeat_interval"] = session_timeout / 3
    config.update(settings or {})
    app = faust.App(names.app_id, **config)
    source = app.topic(names.in_topic, partitions=partitions, key_serializer="raw", value_serializer="json")
    sink = app.topic(names.out_topic, partitions=partitions, key_serializer="raw", value_serializer="json")
    counts = app.Table(
        TABLE_NAME,
        default=int,
        partitions=partitions,
        key_type=str,
        value_type=int,
        extra_topic_configs=dict(changelog_configs or {}),
    )
    pid = os.getpid()

    async def forward(stream: Any) -> None:
        async for event in stream.events():
            key: bytes = event.key
            run_id = key.decode()
            counts[run_id] += 1
            value: dict[str, Any] = dict(event.value) if isinstance(event.value, dict) else {}
            await sink.send(
                key=key,
                value={
                    "key": run_id,
                    "seq": value.get("seq"),
                    "count": counts[run_id],
                    "partition": event.message.partition,
                    "offset": event.message.offset,
                    "pid": pid,
                },
            )

    app.agent(source, name="forward")(forward)
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.faust.proof", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run a faust worker of the proof app until SIGTERM/SIGINT")
    worker.add_argument("--bootstrap", required=True)
    worker.add_argument("--prefix", required=True)
    worker.add_argument("--data-dir", required=True, type=Path)
    worker.add_argument("--partitions", type=int, default=4)
    worker.add_argument("--commit-interval", type=float, default=2.8)
    worker.add_argument("--guarantee", choices=["at_least_once", "exactly_once"], default="at_least_once")
    worker.add_argument("--session-timeout", type=float, default=None)
    worker.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any faust setting; VALUE is parsed as JSON when it parses, else kept as a string",
    )
    worker.add_argument(
        "--changelog-config",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a topic config of the table's changelog (when faust creates it), e.g. segment.ms=5000",
    )
    worker.add_argument("--loglevel", default="info")
    return parser


def _parse_setting(item: str) -> tuple[str, Any]:
    name, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"--setting needs NAME=VALUE, got {item!r}")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``worker`` runs the proof app in this process (exits when stopped)."""
    args = _parser().parse_args(argv)
    app = build_app(
        bootstrap=args.bootstrap,
        prefix=args.prefix,
        data_dir=args.data_dir,
        partitions=args.partitions,
        commit_interval=args.commit_interval,
        guarantee=args.guarantee,
        session_timeout=args.session_timeout,
        settings=dict(_parse_setting(item) for item in args.setting),
        changelog_configs=dict(_parse_setting(item) for item in args.changelog_config),
    )
    worker = faust.Worker(app, loglevel=args.loglevel, redirect_stdouts=False, stdout=sys.stdout)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()

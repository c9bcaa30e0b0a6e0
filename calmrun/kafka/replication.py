"""What the cluster must give calmrun's topics to keep an acknowledged write: the layout check.

calmrun writes with ``acks=all`` in transactions; a write is acknowledged once every in-sync replica has
it, and refused below ``min.insync.replicas``. So a run's history survives the loss of one broker only when
its topics have at least two copies in sync: replication factor 3 and ``min.insync.replicas`` 2 where the
cluster has three brokers or more (2 of 3 keeps writes going while one broker is away). The same holds for
Kafka's own logs calmrun's promise rests on: ``__transaction_state`` (the transactions' outcomes) and
``__consumer_offsets`` (the input positions each transaction commits).

:func:`check_layout` reads every topic's partitions, replication factor and min ISR and returns a
:class:`LayoutReport`: findings that break co-partitioning are always errors; findings about replication
are errors or warnings by ``kafka.replication_check``. Each finding carries the command that fixes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from calmrun.settings import KafkaSettings

log = logging.getLogger("calmrun.topics")

INTERNAL = ("__transaction_state", "__consumer_offsets")
"""Kafka's own topics calmrun relies on: transaction outcomes, committed input offsets."""

_BROKER_DEFAULTS = {
    "__transaction_state": ("transaction.state.log.replication.factor", "transaction.state.log.min.isr"),
    "__consumer_offsets": ("offsets.topic.replication.factor", "min.insync.replicas"),
}


@dataclass(frozen=True)
class TopicLayout:
    """One topic as the cluster holds it (``exists`` False: an internal topic not created yet, described
    by the broker settings it will be created with)."""

    topic: str
    partitions: int
    replication: int
    min_isr: int | None
    exists: bool = True

    def line(self) -> str:
        isr = "-" if self.min_isr is None else str(self.min_isr)
        made = "" if self.exists else "  (not created yet: broker settings)"
        return f"{self.topic}  partitions {self.partitions}  RF {self.replication}  min ISR {isr}{made}"


@dataclass(frozen=True)
class Finding:
    """What cannot keep the promise, on which topic, and the command that fixes it."""

    topic: str
    level: Literal["error", "warning"]
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.level}: {self.topic}: {self.problem}; fix: {self.fix}"


@dataclass(frozen=True)
class LayoutReport:
    """The layout of every calmrun topic and of Kafka's internal topics, with what is wrong."""

    brokers: int
    topics: list[TopicLayout]
    findings: list[Finding] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """calmrun topics not created yet (``calmrun topics check`` only)."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def summary(self) -> str:
        """One line: the topic count and the distinct layouts (for the worker's start log)."""
        shapes: dict[tuple[int, int, int | None], int] = {}
        for t in self.topics:
            if t.topic not in INTERNAL:
                key = (t.partitions, t.replication, t.min_isr)
                shapes[key] = shapes.get(key, 0) + 1
        mine = ", ".join(
            f"{n} with {p} partitions RF {rf} min ISR {'-' if isr is None else isr}"
            for (p, rf, isr), n in sorted(shapes.items(), key=lambda kv: -kv[1])
        )
        internal = "; ".join(
            f"{t.topic} RF {t.replication} min ISR {'-' if t.min_isr is None else t.min_isr}"
            for t in self.topics
            if t.topic in INTERNAL
        )
        return f"topics on {self.brokers} brokers: {mine}; {internal}"


def wanted_min_isr(replication: int, settings: KafkaSettings, broker_default: int | None) -> int | None:
    """The ``min.insync.replicas`` calmrun sets on a topic of ``replication`` copies (None: leave it)."""
    if settings.min_insync_replicas is not None:
        return settings.min_insync_replicas
    if replication >= 3:
        return min(max(2, broker_default or 0), replication - 1)
    return None


async def broker_config(admin: Any, names: Iterable[str]) -> dict[str, str]:
    """The values of ``names`` in one broker's configuration (the controller's); empty when the principal
    may not describe the cluster's configuration (an ACL): the checks then go by the topics alone."""
    wanted = list(names)
    meta = await admin.describe_cluster()
    node = str(meta["controller_id"] if meta.get("controller_id", -1) >= 0 else meta["brokers"][0]["node_id"])
    found: dict[str, str] = {}
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, node, None)])
    except KafkaError as exc:
        log.debug("broker configuration not readable: %r", exc)
        return found
    for resp in responses:
        for res in resp.resources:
            for entry in res[4] if res[0] == 0 else ():
                if entry[0] in wanted and entry[1] is not None:
                    found[entry[0]] = entry[1]
    return found


async def _topic_min_isr(admin: Any, topics: list[str]) -> dict[str, int]:
    if not topics:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, t, None) for t in topics]
    found: dict[str, int] = {}
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError as exc:
        log.debug("topic configuration not readable: %r", exc)
        return found
    for resp in responses:
        for res in resp.resources:
            if res[0] != 0:
                continue
            for entry in res[4]:
                if entry[0] == "min.insync.replicas" and entry[1] is not None:
                    found[res[3]] = int(entry[1])
    return found


async def read_layout(admin: Any, topics: list[str]) -> tuple[int, list[TopicLayout]]:
    """(live brokers, the layout of ``topics`` and of the internal topics); missing topics are left out,
    a missing internal topic is described by the broker settings it will be created with."""
    meta = await admin.describe_cluster()
    brokers = len(meta["brokers"])
    names = list(dict.fromkeys([*topics, *INTERNAL]))
    described = {t["topic"]: t for t in await admin.describe_topics(names) if t["error_code"] == 0}
    isr = await _topic_min_isr(admin, list(described))
    out: list[TopicLayout] = []
    for name in names:
        t = described.get(name)
        if t is not None:
            parts = t["partitions"]
            rf = min((len(p["replicas"]) for p in parts), default=0)
            out.append(TopicLayout(name, len(parts), rf, isr.get(name)))
        elif name in INTERNAL:
            rf_key, isr_key = _BROKER_DEFAULTS[name]
            conf = await broker_config(admin, [rf_key, isr_key])
            if rf_key not in conf:  # neither the topic nor the brokers' settings may be read here (ACLs)
                continue
            rf = int(conf[rf_key])
            out.append(TopicLayout(name, 0, min(rf, brokers), _int(conf.get(isr_key)), exists=False))
    return brokers, out


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None


def judge(
    brokers: int, topics: list[TopicLayout], settings: KafkaSettings, workflow_files: str = "<workflow.yaml>"
) -> LayoutReport:
    """The findings on ``topics`` (see the module docstring); pure."""
    rep: Literal["error", "warning"] = "error" if settings.replication_check == "refuse" else "warning"
    b = settings.bootstrap.split(",")[0].strip()
    want_rf = min(brokers, 3)
    findings: list[Finding] = []
    for t in topics:
        internal = t.topic in INTERNAL
        if not internal and t.partitions != settings.partitions:
            findings.append(_partitions_finding(t, settings, b, workflow_files))
        if t.replication < want_rf:
            fix = (
                f"raise {'transaction.state.log' if 'transaction' in t.topic else 'offsets.topic'}"
                f".replication.factor to {want_rf} on the brokers and add replicas with "
                f"kafka-reassign-partitions.sh --bootstrap-server {b} --execute "
                f"--reassignment-json-file <plan giving each partition {want_rf} replicas>"
                if internal and not t.exists
                else f"kafka-reassign-partitions.sh --bootstrap-server {b} --execute "
                f"--reassignment-json-file <plan giving each partition of {t.topic} {want_rf} replicas>"
            )
            findings.append(
                Finding(
                    t.topic,
                    rep,
                    f"replication factor {t.replication} on a cluster of {brokers} brokers: losing "
                    f"{'that broker' if t.replication == 1 else 'those brokers'} loses acknowledged writes",
                    fix,
                )
            )
        if t.min_isr is None:  # not readable here (an ACL, or a topic this broker has not seen yet)
            continue
        isr = t.min_isr
        if t.replication >= 3 and isr < 2:
            findings.append(
                Finding(
                    t.topic,
                    rep,
                    f"min.insync.replicas {isr} with {t.replication} replicas: a write can be "
                    "acknowledged by one broker alone and lost with it",
                    _isr_fix(t, b, 2),
                )
            )
        elif t.replication > 1 and isr >= t.replication:
            findings.append(
                Finding(
                    t.topic,
                    rep,
                    f"min.insync.replicas {isr} with {t.replication} replicas: the loss of any one broker "
                    "stops every write",
                    _isr_fix(t, b, t.replication - 1),
                )
            )
    return LayoutReport(brokers, topics, findings)


def _isr_fix(t: TopicLayout, bootstrap: str, value: int) -> str:
    if not t.exists:
        key = "transaction.state.log.min.isr" if "transaction" in t.topic else "min.insync.replicas"
        return f"set {key}={value} on the brokers before the topic is created"
    return (
        f"kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics "
        f"--entity-name {t.topic} --add-config min.insync.replicas={value}"
    )


def _partitions_finding(t: TopicLayout, s: KafkaSettings, bootstrap: str, files: str) -> Finding:
    """A calmrun topic with another partition count: typically auto-created by a producer that wrote
    before ``calmrun topics create`` (the broker's ``num.partitions``)."""
    create = f"calmrun topics create -w {files} -b {s.bootstrap} --prefix {s.prefix}"
    if t.partitions < s.partitions and t.topic.endswith(".runs.requests"):  # misplaced requests are moved
        fix = (
            f"kafka-topics.sh --bootstrap-server {bootstrap} --alter --topic {t.topic} "
            f"--partitions {s.partitions}"
        )
    else:
        fix = (
            f"kafka-topics.sh --bootstrap-server {bootstrap} --delete --topic {t.topic} && {create} "
            "(its records are deleted with it)"
        )
    return Finding(
        t.topic,
        "error",
        f"{t.partitions} partitions but calmrun is configured for {s.partitions}; all calmrun topics must "
        "have the same count (was it auto-created by a producer before `calmrun topics create`?)",
        fix,
    )

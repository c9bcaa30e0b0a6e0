"""Topic names and their creation: every calmrun topic has the same partition count (co-partitioned).

A run ID hashes (murmur2, as the Java client does) to one partition number, and that partition of every
topic (requests, step topics, state, events) belongs to one worker at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from calmrun.errors import CalmrunError, ConfigError, KafkaAuthorizationError
from calmrun.kafka.connect import client_kwargs, diagnose, start_checked
from calmrun.kafka.replication import LayoutReport, broker_config, judge, read_layout, wanted_min_isr
from calmrun.settings import KafkaSettings
from calmrun.workflow.definition import WorkflowDef

log = logging.getLogger("calmrun.topics")

INVALID = "_invalid"
"""DLQ suffix for records that name no known workflow (undecodable, unknown workflow)."""


PARTITION_CACHE = 4096
"""Run IDs whose partition ``partition_for`` keeps: its entries hold about 0.55 MiB for 4,096 UUIDs (beside
the IDs they keep alive); a run in flight is asked for a few times within its life."""


@functools.lru_cache(maxsize=PARTITION_CACHE)
def partition_for(run_id: str, partitions: int) -> int:
    """The partition of ``run_id`` in every calmrun topic (the Java client's murmur2 partitioner).

    Memoised: a worker asks for the same run's partition at its request, each attempt and each result,
    and aiokafka's murmur2 is pure Python (about 13 µs a call); the answer never changes.
    """
    h: int = murmur2(run_id.encode())
    return (h & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Topics:
    """The topic names under one prefix."""

    prefix: str

    @property
    def requests(self) -> str:
        return f"{self.prefix}.runs.requests"

    @property
    def state(self) -> str:
        return f"{self.prefix}.runs.state"

    @property
    def events(self) -> str:
        return f"{self.prefix}.runs.events"

    @property
    def results(self) -> str:
        """Step results from pool executors, keyed by run ID (co-partitioned with the run state)."""
        return f"{self.prefix}.runs.results"

    @property
    def journal(self) -> str:
        """The agent journal: each model request and tool call of a step attempt, keyed by run ID."""
        return f"{self.prefix}.agents.journal"

    def step(self, workflow: str, step: str) -> str:
        return f"{self.prefix}.step.{workflow}.{step}"

    def pool_group(self, pool: str) -> str:
        """The consumer group (and transactional-id prefix) of the executors of ``pool``."""
        return f"{self.prefix}.pool.{pool}"

    def dlq(self, workflow: str) -> str:
        return f"{self.prefix}.dlq.{workflow}"

    def step_topics(self, workflows: Iterable[WorkflowDef], pool: str | None = None) -> list[str]:
        """The step topics of these workflows' agent steps (an approval or a wait has none); only those of
        steps in ``pool`` when one is given."""
        return [
            self.step(wf.name, s.name)
            for wf in workflows
            for s in wf.steps
            if s.executed() and (pool is None or s.pool == pool)
        ]

    def worker_inputs(self, workflows: Sequence[WorkflowDef], pool: str | None) -> list[str]:
        """What a deciding worker executing ``pool`` (``None``: none) reads: the requests, the results when a
        step runs elsewhere (only a group with pools has results to read), its pool's step topics (once
        for every version)."""
        steps = self.step_topics(workflows, pool) if pool is not None else []
        pooled = pool is None or any(s.pool != pool for wf in workflows for s in wf.steps)
        return [self.requests, *([self.results] if pooled else []), *dict.fromkeys(steps)]

    def framed(self, workflows: Iterable[WorkflowDef]) -> dict[str, tuple[str, ...]]:
        """The topics whose records others read, with the record types on each (``wire.format``)."""
        out: dict[str, tuple[str, ...]] = {
            self.requests: ("RunRequest", "RunCommand"),
            self.events: ("RunEvent",),
            self.results: ("StepResultRecord",),
        }
        for name in self.step_topics(workflows):
            out[name] = ("StepTask",)
        return out

    def all(self, workflows: Iterable[WorkflowDef]) -> dict[str, dict[str, str]]:
        """Every topic for these workflows with its topic-level configuration."""
        wfs = list(workflows)
        forever = {"retention.ms": "-1"}
        topics: dict[str, dict[str, str]] = {
            self.requests: {},
            self.state: {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "600000"},
            self.events: {},
            self.results: {},
            self.journal: {},
            self.dlq(INVALID): forever,
        }
        for wf in wfs:
            topics[self.dlq(wf.name)] = forever
        for name in self.step_topics(wfs):
            topics[name] = {}
        return topics


async def start_client(client: Any, settings: KafkaSettings) -> None:
    """Start an aiokafka producer or consumer (built with ``client_kwargs``); on failure stop it and raise.

    Raises:
        KafkaAuthError: the broker refused TLS, SASL or the protocol (names broker and mechanism).
        BrokerUnavailableError: no broker answers at the bootstrap address.
    """
    await start_checked(client, settings)


@contextlib.asynccontextmanager
async def admin_client(settings: KafkaSettings, role: str = "") -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client with the configured security, closed on exit.

    Raises:
        KafkaAuthError: the broker refused TLS, SASL or the protocol (names broker and mechanism).
        BrokerUnavailableError: no broker answers at the bootstrap address.
    """
    client_id = f"{settings.client_id}-{role}" if role else settings.client_id
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap, client_id=client_id, **client_kwargs(settings)
    )
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        await admin.close()
        raise (await diagnose(settings, exc)) from exc
    try:
        yield admin
    finally:
        await admin.close()


def new_topic(name: str, partitions: int, replication: int | None, configs: dict[str, str]) -> NewTopic:
    """A CreateTopics entry; ``replication`` None leaves the replication factor to the broker's
    ``default.replication.factor`` (-1 on the wire, which aiokafka's ``NewTopic`` does not accept)."""
    topic = NewTopic(
        name, num_partitions=partitions, replication_factor=replication or 1, topic_configs=configs
    )
    if replication is None:
        topic.replication_factor = -1
    return topic


async def create_topics(
    settings: KafkaSettings,
    wanted: dict[str, dict[str, str]],
    role: str = "",
    *,
    workflow_files: str = "<workflow.yaml>",
) -> list[str]:
    """Create the missing topics of ``wanted`` (name -> topic config), calmrun's partition count; idempotent.

    The replication factor is ``kafka.replication_factor``, or the cluster's default when unset; each new
    topic gets ``min.insync.replicas`` (:func:`~calmrun.kafka.replication.wanted_min_isr`). Then every topic
    of ``wanted`` and Kafka's internal topics are checked (:mod:`calmrun.kafka.replication`): the layout is
    logged, warnings are logged, errors are raised with the commands that fix them.

    Returns:
        The names it created.

    Raises:
        BrokerUnavailableError: no broker answers at the bootstrap address.
        ConfigError: a topic has a different partition count (co-partitioning would break), or a
            replication finding when ``kafka.replication_check`` is ``refuse``.
    """
    async with admin_client(settings, role) as admin:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            rf = settings.replication_factor
            conf = await broker_config(admin, ["default.replication.factor", "min.insync.replicas"])
            effective = rf or int(conf.get("default.replication.factor", "1"))
            default_isr = int(conf["min.insync.replicas"]) if "min.insync.replicas" in conf else None
            isr = wanted_min_isr(effective, settings, default_isr)
            extra = {"min.insync.replicas": str(isr)} if isr is not None else {}
            new = [new_topic(t, settings.partitions, rf, {**extra, **wanted[t]}) for t in missing]
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker created them first
                response = await admin.create_topics(new)
                _raise_refusals(response)
        brokers, layout = await read_layout(admin, list(wanted))
        for _ in range(50):  # a topic just created may take a moment to show in every broker's metadata
            mine = [t for t in layout if t.topic in wanted]
            readable = any(t.min_isr is not None for t in mine)  # else an ACL hides every topic's config
            if len(mine) == len(wanted) and (not readable or all(t.min_isr is not None for t in mine)):
                break
            await asyncio.sleep(0.2)
            brokers, layout = await read_layout(admin, list(wanted))
        report = judge(brokers, layout, settings, workflow_files)
    log.info("%s", report.summary())
    for finding in report.findings:
        if finding.level == "warning":
            log.warning("%s", finding.line())
    if report.errors:
        raise ConfigError("; ".join(f.line() for f in report.errors))
    return missing


async def check_topics(settings: KafkaSettings, workflows: Iterable[WorkflowDef]) -> LayoutReport:
    """The layout of these workflows' topics and of Kafka's internal topics, with findings; creates
    nothing (``calmrun topics check``).

    Raises:
        BrokerUnavailableError: no broker answers at the bootstrap address.
    """
    wanted = list(Topics(settings.prefix).all(workflows))
    async with admin_client(settings, "check") as admin:
        present = set(await admin.list_topics())
        report = judge(*await read_layout(admin, [t for t in wanted if t in present]), settings)
    missing = [t for t in wanted if t not in present]
    return LayoutReport(report.brokers, report.topics, report.findings, missing)


async def check_readable(settings: KafkaSettings, topic: str, missing: CalmrunError) -> NoReturn:
    """Raise why ``topic`` is not in this client's metadata: an ACL (``KafkaAuthorizationError``) or
    ``missing`` (it does not exist). Kafka lists only the topics a principal may describe."""
    async with admin_client(settings, "describe") as admin:
        found = await admin.describe_topics([topic])
    if found and found[0]["error_code"] == 29:  # TOPIC_AUTHORIZATION_FAILED
        raise KafkaAuthorizationError("topic", topic, detail="Describe refused")
    raise missing


def _raise_refusals(response: Any) -> None:
    """Raise the first per-topic error of a CreateTopics response (aiokafka returns them, not raises)."""
    from aiokafka.errors import TopicAlreadyExistsError as Exists
    from aiokafka.errors import for_code

    for entry in response.topic_errors:
        topic, code = entry[0], entry[1]
        if code == 0 or for_code(code) is Exists:
            continue
        message = entry[2] if len(entry) > 2 and entry[2] else for_code(code).__name__
        if code in (29, 31):  # TOPIC_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED
            raise KafkaAuthorizationError("topic", topic, detail=f"Create refused: {message}")
        raise ConfigError(f"cannot create topic {topic}: {message}")


async def ensure_topics(settings: KafkaSettings, workflows: Iterable[WorkflowDef]) -> list[str]:
    """Create every missing calmrun topic of these workflows; idempotent. Returns the names it created.

    Raises:
        BrokerUnavailableError: no broker answers at the bootstrap address.
        ConfigError: an existing topic has a different partition count (co-partitioning would break).
    """
    return await create_topics(settings, Topics(settings.prefix).all(workflows))

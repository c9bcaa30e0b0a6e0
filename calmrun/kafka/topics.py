"""Topic names and their creation: every calmrun topic has the same partition count (co-partitioned).

A run ID hashes (murmur2, as the Java client does) to one partition number, and that partition of every
topic (requests, step topics, state, events) belongs to one worker at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from calmrun.errors import CalmrunError, ConfigError, KafkaAuthorizationError
from calmrun.kafka.connect import client_kwargs, diagnose, start_checked
from calmrun.settings import KafkaSettings
from calmrun.workflow.definition import WorkflowDef

INVALID = "_invalid"
"""DLQ suffix for records that name no known workflow (undecodable, unknown workflow)."""


def partition_for(run_id: str, partitions: int) -> int:
    """The partition of ``run_id`` in every calmrun topic (the Java client's murmur2 partitioner)."""
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


async def create_topics(
    settings: KafkaSettings, wanted: dict[str, dict[str, str]], role: str = ""
) -> list[str]:
    """Create the missing topics of ``wanted`` (name -> topic config), calmrun's partition count; idempotent.

    Returns:
        The names it created.

    Raises:
        BrokerUnavailableError: no broker answers at the bootstrap address.
        ConfigError: an existing topic has a different partition count (co-partitioning would break).
    """
    async with admin_client(settings, role) as admin:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            new = [
                NewTopic(
                    t,
                    num_partitions=settings.partitions,
                    replication_factor=settings.replication_factor,
                    topic_configs=wanted[t],
                )
                for t in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker created them first
                response = await admin.create_topics(new)
                _raise_refusals(response)
        present = [t for t in wanted if t in existing]
        if present:
            for meta in await admin.describe_topics(present):
                count = len(meta["partitions"])
                if count != settings.partitions:
                    raise ConfigError(
                        f"topic {meta['topic']} has {count} partitions but calmrun is configured for "
                        f"{settings.partitions}; all calmrun topics must have the same count"
                    )
        return missing


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

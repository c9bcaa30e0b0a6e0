"""The Kafka ACLs that confine one team to one prefix: what a worker, the cost aggregator, an operator (CLI)
and a read-only viewer need, and applying them with CreateAcls.

Everything calmrun names under a prefix ``P`` is covered by prefixed ACLs:

- topics ``P.`` (requests, steps, state, events, DLQs, cost totals);
- consumer groups: the workers' ``<group_id>`` (default ``P.workers``) and the aggregator's ``<app_id>``
  (default ``P-costs``); the CLI, replay and the cost readers assign partitions and use no group;
- transactional IDs ``<group_id>.tx.`` (each worker's writer, and the ids of earlier calmruns' per-partition
  writers, which a takeover fences) and ``P.costs.tx.``
  (the cost aggregator's);
- pool executors' groups ``P.pool.<pool>`` and their transactional IDs ``P.pool.<pool>.tx.``.

The ACLs never use a bare prefix ``P`` without its ``.``: team ``a`` must not match team ``ab``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from calmrun.errors import CalmrunError, ConfigError
from calmrun.settings import Settings

Role = Literal["worker", "costs", "operator", "viewer", "ui", "executor"]
ROLES: tuple[Role, ...] = ("worker", "costs", "operator", "viewer", "ui", "executor")
DEFAULT_ROLES: tuple[Role, ...] = ROLES[:4]
"""What ``calmrun acls`` prints without ``--role``; ``ui`` (the operator page) and ``executor`` (pool
executors, ``calmrun worker --pool``) are asked for by name."""

# Kafka's wire codes (org.apache.kafka.common.resource / acl)
_RESOURCE = {"topic": 2, "group": 3, "cluster": 4, "transactional_id": 5}
_PATTERN = {"literal": 3, "prefixed": 4}
_OPERATION = {
    "Read": 3,
    "Write": 4,
    "Create": 5,
    "Delete": 6,
    "Describe": 8,
    "DescribeConfigs": 10,
    "IdempotentWrite": 12,
}
_ALLOW = 3


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW binding: ``principal`` may ``operation`` on the ``resource`` named (or prefixed) ``name``."""

    resource: Literal["topic", "group", "cluster", "transactional_id"]
    pattern: Literal["literal", "prefixed"]
    name: str
    operation: str
    principal: str
    host: str = "*"

    def line(self) -> str:
        who, op, kind = f"{self.principal:<14}", f"{self.operation:<15}", f"{self.resource:<16}"
        return f"ALLOW {who} {op} {kind} {self.pattern:<8} {self.name}"

    def kafka_acls_args(self) -> str:
        """The same ACL as ``kafka-acls.sh`` arguments."""
        kind = {"topic": "--topic", "group": "--group", "transactional_id": "--transactional-id"}
        target = "--cluster" if self.resource == "cluster" else f"{kind[self.resource]} '{self.name}'"
        pattern = " --resource-pattern-type prefixed" if self.pattern == "prefixed" else ""
        return f"--add --allow-principal '{self.principal}' --operation {self.operation} {target}{pattern}"


def principal_of(user: str) -> str:
    """``alice`` -> ``User:alice``; a principal with a type (``User:alice``) is kept as is."""
    return user if ":" in user else f"User:{user}"


def acls_for(settings: Settings, principal: str, role: Role) -> list[Acl]:
    """The ACLs ``principal`` needs in ``role`` for ``settings.kafka.prefix`` (and its group/app ids).

    Raises:
        ConfigError: an unknown role.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    who = principal_of(principal)
    prefix = settings.kafka.prefix
    topics = f"{prefix}."
    group = settings.group_id
    app_id = settings.costs.app_id or f"{prefix}-costs"
    out: list[Acl] = []

    def add(resource: str, pattern: str, name: str, *operations: str) -> None:
        out.extend(Acl(resource, pattern, name, op, who) for op in operations)  # type: ignore[arg-type]

    if role == "worker":
        add("topic", "prefixed", topics, "Read", "Write", "Describe", "Create")
        add("group", "literal", group, "Read", "Describe")
        add("transactional_id", "prefixed", f"{group}.tx.", "Write", "Describe")
    elif role == "costs":
        add("topic", "prefixed", topics, "Read", "Write", "Describe", "Create")
        add("group", "literal", app_id, "Read", "Describe")
        add("transactional_id", "prefixed", f"{prefix}.costs.tx.", "Write", "Describe")
    elif role == "executor":  # calmrun worker --pool NAME: step topics in, results (and dead letters) out
        add("topic", "prefixed", topics, "Read", "Write", "Describe")
        add("group", "prefixed", f"{prefix}.pool.", "Read", "Describe")
        add("transactional_id", "prefixed", f"{prefix}.pool.", "Write", "Describe")
    elif role == "operator":
        add("topic", "prefixed", topics, "Read", "Write", "Describe", "Create")
    elif role == "ui":  # calmrun ui: reads the topics, redrives (writes requests), describes both groups' lag
        add("topic", "prefixed", topics, "Read", "Write", "Describe")
        add("group", "literal", group, "Describe")
        add("group", "literal", app_id, "Describe")
    else:
        add("topic", "prefixed", topics, "Read", "Describe")
    return out


async def apply_acls(settings: Settings, acls: list[Acl]) -> int:
    """Create ``acls`` on the cluster (idempotent: an existing binding is created again, unchanged).

    The connecting principal (``settings.kafka.security``) needs Alter on the cluster (a super user).

    Returns:
        How many bindings were created.

    Raises:
        KafkaAuthError, BrokerUnavailableError: the broker refused or did not answer.
        CalmrunError: the broker refused a binding (the message names it).
    """
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import CreateAclsRequest

    from calmrun.kafka.topics import admin_client

    async with admin_client(settings.kafka, "acls") as admin:
        for acl in acls:
            request = CreateAclsRequest(
                resource_type=_RESOURCE[acl.resource],
                resource_name="kafka-cluster" if acl.resource == "cluster" else acl.name,
                resource_pattern_type_filter=_PATTERN[acl.pattern],
                principal=acl.principal,
                host=acl.host,
                operation=_OPERATION[acl.operation],
                permission_type=_ALLOW,
            )
            response = await admin._send_request(request)  # aiokafka has the request, not a method
            for code, message in response.creation_responses:
                if code != 0:
                    raise CalmrunError(
                        f"the broker refused the ACL [{acl.line()}]: {message or for_code(code).__name__}"
                    )
    return len(acls)

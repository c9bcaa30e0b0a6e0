"""The Workers view: the consumer groups' members and partitions, and their lag per topic.

Asked of the broker when the view is opened (the admin API: describe groups, committed offsets, end
offsets); nothing here is cached in the index. The workers' group is ``settings.group_id``; the cost
aggregator's is ``costs.app_id`` (default ``<prefix>-costs``), whose lag on the events topic is how far
the cost table is behind.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import admin_client, start_client
from calmrun.settings import Settings


async def describe_groups(settings: Settings) -> list[dict[str, Any]]:
    """Members, their partitions and the lag per topic of the workers' and the aggregator's groups."""
    groups = [
        ("workers", settings.group_id),
        ("cost aggregator", settings.costs.app_id or f"{settings.kafka.prefix}-costs"),
    ]
    out: list[dict[str, Any]] = []
    async with admin_client(settings.kafka, "ui") as admin:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"{settings.kafka.client_id}-ui-lag",
            **client_kwargs(settings.kafka),
        )
        await start_client(consumer, settings.kafka)
        try:
            for role, gid in groups:
                out.append(await _group(admin, consumer, role, gid))
        finally:
            await consumer.stop()
    return out


async def _group(admin: Any, consumer: AIOKafkaConsumer, role: str, gid: str) -> dict[str, Any]:
    info: dict[str, Any] = {"role": role, "group": gid, "state": "unknown", "members": [], "lag": []}
    try:
        (resp,) = await admin.describe_consumer_groups([gid])
        group = resp.groups[0]
        info["state"] = group[2]
        for m in group[5]:
            member_id, client_id, host = m[0], m[1], m[2]
            instance = m[3] if len(m) > 5 else None
            assigned: dict[str, list[int]] = {}
            with contextlib.suppress(Exception):  # an empty or foreign assignment has nothing to show
                a = ConsumerProtocolMemberAssignment.decode(m[-1])
                assigned = {t: sorted(ps) for t, ps in a.assignment}
            info["members"].append(
                {
                    "member": member_id,
                    "client": client_id,
                    "host": host,
                    "instance": instance,
                    "partitions": _compact(assigned),
                }
            )
        committed = await admin.list_consumer_group_offsets(gid)
    except KafkaError as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info
    tps = [tp for tp, om in committed.items() if om.offset >= 0]
    ends = await consumer.end_offsets(tps) if tps else {}
    per_topic: dict[str, list[int]] = {}
    for tp in tps:
        row = per_topic.setdefault(tp.topic, [0, 0])
        row[0] += max(0, ends[TopicPartition(tp.topic, tp.partition)] - committed[tp].offset)
        row[1] += 1
    info["lag"] = [{"topic": t, "lag": v[0], "partitions": v[1]} for t, v in sorted(per_topic.items())]
    return info


def _compact(assigned: dict[str, list[int]]) -> str:
    """``{'p.runs.events': [0, 1], 'p.runs.state': [0, 1]}`` -> ``'0,1 of 2 topics'`` when all agree."""
    if not assigned:
        return "-"
    sets = {tuple(ps) for ps in assigned.values()}
    if len(sets) == 1:
        return f"{', '.join(map(str, next(iter(sets))))} (of each of {len(assigned)} topics)"
    return "; ".join(f"{t}: {', '.join(map(str, ps))}" for t, ps in sorted(assigned.items()))

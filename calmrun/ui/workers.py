"""The Workers view: the consumer groups' members and partitions, and their lag per topic.

Asked of the broker when the view is opened (the admin API: describe groups, committed offsets, end
offsets); nothing here is cached in the index. The workers' group is ``settings.group_id``; the cost
aggregator's is ``costs.app_id`` (default ``<prefix>-costs``), whose lag on the events topic is how far
the cost table is behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import Topics, admin_client, start_client
from calmrun.settings import Settings
from calmrun.ui.index import RunIndex
from calmrun.workflow.definition import DEFAULT_POOL, WorkflowDef


async def describe_groups(settings: Settings, pools: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Members, their partitions and the lag per topic of the workers', the step pools' and the
    aggregator's groups. A pool's group is listed when the broker knows it or ``pools`` names it."""
    groups = [("workers", settings.group_id)]
    topics = Topics(settings.kafka.prefix)
    out: list[dict[str, Any]] = []
    async with admin_client(settings.kafka, "ui") as admin:
        head = topics.pool_group("")
        known = {str(g[0]) for g in await admin.list_consumer_groups() if str(g[0]).startswith(head)}
        for name in sorted(known | {topics.pool_group(p) for p in pools}):
            groups.append((f"pool {name[len(head) :]}", name))
        groups.append(("cost aggregator", settings.costs.app_id or f"{settings.kafka.prefix}-costs"))
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


POOL_METRICS = {"calmrun_pool_fenced": "fenced", "calmrun_pool_tasks_running": "running"}


async def pool_counts(urls: Sequence[str], timeout_s: float = 3.0) -> dict[str, dict[str, Any]]:
    """Per pool, fencing (partitions lost to another executor's takeover) and agents running, summed
    over the executors' ``/metrics`` at ``urls``; an executor that does not answer is listed by URL."""
    out: dict[str, dict[str, Any]] = {}
    unreachable: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        for url in urls:
            try:
                async with http.get(url) as resp:
                    resp.raise_for_status()
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                unreachable.append(f"{url}: {type(exc).__name__}")
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    field = POOL_METRICS.get(sample.name.removesuffix("_total"))
                    if field is None or sample.name.endswith("_created"):
                        continue
                    row = out.setdefault(
                        sample.labels.get("pool", "?"), {"fenced": 0, "running": 0, "executors": 0}
                    )
                    row[field] += int(sample.value)
                    if field == "fenced":
                        row["executors"] += 1
    if unreachable:
        out["_unreachable"] = {"urls": unreachable}
    return out


async def workers_view(
    settings: Settings, definitions: Sequence[WorkflowDef], index: RunIndex, pool_metrics: Sequence[str]
) -> dict[str, Any]:
    """The Workers view: every group with its members and lag; a step pool's group also with the attempts
    issued to it (from the run states) and, from its executors' ``/metrics``, agents running and fencings.

    Raises:
        CalmrunError: the broker's admin API could not be asked.
    """
    pool_of = {(d.name, s.name): s.pool for d in definitions for s in d.steps if s.kind == "agent"}
    groups = await describe_groups(settings, {p for p in pool_of.values() if p != DEFAULT_POOL})
    counts = await pool_counts(pool_metrics) if pool_metrics else {}
    issued: dict[str, int] = {}
    for (wf, step), n in index.issued().items():
        pool = pool_of.get((wf, step))
        if pool:
            issued[pool] = issued.get(pool, 0) + n
    for g in groups:
        if g["role"].startswith("pool "):
            g["issued"] = issued.get(g["role"][5:], 0)
            g["executors"] = counts.get(g["role"][5:])
    unreachable = counts.get("_unreachable", {}).get("urls", [])
    return {"groups": groups, "metrics": {"configured": bool(pool_metrics), "unreachable": unreachable}}

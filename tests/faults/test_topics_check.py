"""Replication that keeps data: topics take the cluster's replication factor, min ISR 2 where there are
three copies, and ``calmrun topics check`` / the worker at start refuse (or warn about) what cannot keep an
acknowledged write; a topic auto-created with the wrong partition count names the command that fixes it."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from typer.testing import CliRunner

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.cli import app
from calmrun.devkafka.cluster import DevCluster
from calmrun.errors import ConfigError
from calmrun.kafka.topics import Topics, check_topics, ensure_topics
from calmrun.settings import load_settings
from calmrun.streams.worker import Worker
from tests.runtime_support import add_one, linear

pytestmark = pytest.mark.fault


async def test_topics_take_the_clusters_replication_and_min_isr_two(cluster: DevCluster, prefix: str) -> None:
    settings = load_settings(kafka={"bootstrap": cluster.bootstrap, "prefix": prefix})
    created = await ensure_topics(settings.kafka, [linear()])
    report = await check_topics(settings.kafka, [linear()])
    mine = {t.topic: t for t in report.topics}
    assert set(created) <= set(mine) and report.brokers == 3
    for name in created:
        assert (mine[name].partitions, mine[name].replication, mine[name].min_isr) == (4, 3, 2), mine[name]
    assert report.findings == [], report.findings
    internal = {t.topic: t for t in report.topics if t.topic.startswith("__")}
    assert {t.replication for t in internal.values()} == {3}
    assert {t.min_isr for t in internal.values()} == {2}


async def test_a_single_copy_topic_is_refused_or_warned_with_the_fix(
    cluster: DevCluster, prefix: str
) -> None:
    one = load_settings(kafka={"bootstrap": cluster.bootstrap, "prefix": prefix, "replication_factor": 1})
    with pytest.raises(ConfigError) as refused:
        await ensure_topics(one.kafka, [linear()])
    assert "replication factor 1 on a cluster of 3 brokers" in str(refused.value)
    assert "kafka-reassign-partitions.sh" in str(refused.value)
    warn = load_settings(
        kafka={"bootstrap": cluster.bootstrap, "prefix": prefix, "replication_check": "warn"}
    )
    await ensure_topics(warn.kafka, [linear()])  # starts, with warnings logged
    wf = "examples/triage/workflow.yaml"
    args = ["topics", "check", "-w", wf, "-b", cluster.bootstrap, "--prefix", prefix, "--json"]
    result = await asyncio.to_thread(CliRunner().invoke, app, args)  # the CLI runs its own event loop
    assert result.exit_code == 1, result.output
    found = json.loads(result.output)
    events = next(t for t in found["topics"] if t["topic"] == Topics(prefix).events)
    assert (events["partitions"], events["replication"]) == (4, 1)
    assert {f["topic"] for f in found["findings"] if "replication factor 1" in f["problem"]} >= {
        Topics(prefix).requests,
        Topics(prefix).state,
        Topics(prefix).events,
    }


async def test_an_auto_created_topic_with_another_partition_count_names_its_fix(
    cluster: DevCluster, prefix: str
) -> None:
    """A producer wrote before ``calmrun topics create``: the broker made runs.requests with 1 partition."""
    topics, broker = Topics(prefix), cluster.bootstrap
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.requests, 1, 3)])
    finally:
        await admin.close()
    settings = load_settings(kafka={"bootstrap": broker, "prefix": prefix})
    worker = Worker(settings, [linear()], AgentRegistry({"add_one": add_one}), ModelRegistry({}))
    with pytest.raises(ConfigError) as refused:
        await worker.start()
    text = str(refused.value)
    assert f"{topics.requests}: 1 partitions but calmrun is configured for 4" in text
    assert (
        f"kafka-topics.sh --bootstrap-server {broker.split(',')[0]} --alter --topic {topics.requests} "
        "--partitions 4" in text
    )

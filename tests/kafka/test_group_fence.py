"""KIP-447 fencing is reachable from both of calmrun's clients (``bench.group_fence``): a transaction whose
offsets carry a group member's current generation commits; with the generation a rebalance made stale the
group coordinator refuses them (ILLEGAL_GENERATION), and neither the refused transaction's record nor its
offsets ever become visible. aiokafka sends TxnOffsetCommit v3 through ``GroupProducer``; confluent-kafka
takes librdkafka's group metadata built from the aiokafka consumer's member id and generation."""

from __future__ import annotations

import pytest

from bench.group_fence import Client, fence_check

ILLEGAL_GENERATION = 22


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", ["aiokafka", "confluent"])
async def test_offsets_of_a_stale_generation_are_refused_and_their_transaction_never_commits(
    broker: str, client: Client
) -> None:
    r = await fence_check(broker, client)

    assert r["current"] == "ok"
    assert r["committed_after_current"] == 1
    assert r["generations"][1] > r["generations"][0]
    refused = r["stale"]
    assert refused["offsets"]["code"] == ILLEGAL_GENERATION, refused
    assert refused["commit"]["code"] == ILLEGAL_GENERATION, refused  # the transaction can only be aborted
    assert refused["aborted"]
    assert r["committed_after_stale"] == 1  # the refused transaction's offset (2) never committed
    assert r["new"] == "ok"
    assert r["committed_after_new"] == 3
    assert r["read_committed"] == ["current", "new"]  # the refused transaction's record is not visible

"""The worker's transactional producers: how soon a transaction refused as busy is tried again, and the
second lane's producer (``streams.txn``)."""

from __future__ import annotations

import pytest
from aiokafka.producer import sender
from pydantic import ValidationError

from calmrun.settings import KafkaSettings, Settings
from calmrun.streams.clients import spare_producer, transactional_producer


async def test_a_busy_transaction_is_retried_after_the_configured_wait() -> None:
    before = sender.BACKOFF_OVERRIDE
    try:
        assert Settings().kafka.txn_busy_retry_ms == 1.0
        settings = Settings(kafka=KafkaSettings(txn_busy_retry_ms=3))
        producer = transactional_producer(settings, 0)
        assert sender.BACKOFF_OVERRIDE == 0.003
        assert producer.client._client_id == "calmrun-tx-0"
    finally:
        sender.BACKOFF_OVERRIDE = before


async def test_the_second_lane_is_made_only_when_two_lanes_are_set() -> None:
    before = sender.BACKOFF_OVERRIDE
    try:
        assert Settings().kafka.txn_lanes == 2
        spare = spare_producer(Settings(kafka=KafkaSettings(group_id="g")), 3)
        assert spare is not None
        assert spare._txn_manager.transactional_id == "g.tx.3.b"
        assert spare.client._client_id == "calmrun-tx-3b"
        assert spare_producer(Settings(kafka=KafkaSettings(txn_lanes=1)), 3) is None
        with pytest.raises(ValidationError):
            KafkaSettings.model_validate({"txn_lanes": 3})
    finally:
        sender.BACKOFF_OVERRIDE = before

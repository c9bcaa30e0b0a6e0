"""The worker's transactional producers: how soon a transaction refused as busy is tried again."""

from __future__ import annotations

from aiokafka.producer import sender

from calmrun.settings import KafkaSettings, Settings
from calmrun.streams.clients import transactional_producer


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

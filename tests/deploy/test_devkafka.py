"""The project's broker launcher: starts a real KRaft broker, answers metadata, and stops exactly it."""

from __future__ import annotations

from pathlib import Path

import pytest

from calmrun.devkafka import DevKafka, answers_metadata, default_cache_dir, fetch_jars
from calmrun.errors import DevKafkaError
from calmrun.localproc import free_port


def test_jars_are_cached_and_reused() -> None:
    jars = fetch_jars()
    assert jars.parent == default_cache_dir()
    assert (default_cache_dir() / ".complete").exists()
    assert any(jars.glob("kafka_2.13-4.4.0.jar"))
    assert any(jars.glob("log4j-slf4j-impl-*.jar")), "without a binding the broker logs nothing"
    assert fetch_jars() == jars


def test_start_stop_a_second_broker(tmp_path: Path) -> None:
    kafka = DevKafka(data_dir=tmp_path / "k", port=free_port())
    kafka.start()
    try:
        pid = kafka.running_pid()
        assert pid is not None
        assert answers_metadata(kafka.bootstrap)
        assert "127.0.0.1" in (kafka.data_dir / "server.properties").read_text()
        with pytest.raises(DevKafkaError, match="already runs"):
            kafka.start()
    finally:
        assert kafka.stop()
    assert kafka.running_pid() is None
    assert (
        not Path(f"/proc/{pid}").exists() or b"kafka.Kafka" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    assert not answers_metadata(kafka.bootstrap)
    assert not kafka.stop(), "stopping twice is a no-op"

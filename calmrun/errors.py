"""One exception hierarchy for calmrun: every error a caller may act on derives from CalmrunError."""

from __future__ import annotations

from typing import ClassVar


class CalmrunError(Exception):
    """Base of every calmrun error.

    Attributes:
        retriable: whether repeating the same operation may succeed.
    """

    retriable: ClassVar[bool] = False


class ConfigError(CalmrunError):
    """Configuration or a workflow definition is invalid; the message says where."""


class BrokerUnavailableError(CalmrunError):
    """The Kafka broker at ``bootstrap`` did not answer."""

    retriable: ClassVar[bool] = True

    def __init__(self, bootstrap: str, detail: str = "") -> None:
        hint = "start one with `python -m calmrun.devkafka start` or set CALMRUN_KAFKA__BOOTSTRAP"
        super().__init__(f"no Kafka broker answers at {bootstrap}{': ' + detail if detail else ''} ({hint})")
        self.bootstrap = bootstrap


class DevKafkaError(CalmrunError):
    """The local development broker could not be fetched, formatted, started or stopped."""


class SerializationError(CalmrunError):
    """A value could not be encoded to or decoded from its wire format."""


class DecodeError(SerializationError):
    """Bytes read from Kafka could not be decoded.

    Attributes:
        reason: what was wrong with the bytes.
    """

    def __init__(self, reason: str, *, topic: str | None = None, offset: int | None = None) -> None:
        where = f" ({topic}@{offset})" if topic is not None else ""
        super().__init__(f"undecodable record{where}: {reason}")
        self.reason = reason
        self.topic = topic
        self.offset = offset


class UnknownSchemaError(DecodeError):
    """Avro single-object bytes name a schema fingerprint this process does not know."""

    def __init__(self, fingerprint: bytes) -> None:
        super().__init__(f"unknown Avro schema fingerprint {fingerprint.hex()}")
        self.fingerprint = fingerprint

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


class UnknownModelError(CalmrunError):
    """A step names a model alias that the configuration does not define.

    Attributes:
        alias: the alias asked for.
        known: the aliases the configuration defines.
    """

    def __init__(self, alias: str, known: list[str]) -> None:
        names = ", ".join(sorted(known)) or "none; add them under `models:` in the configuration"
        super().__init__(f"unknown model alias {alias!r}; known aliases: {names}")
        self.alias = alias
        self.known = sorted(known)


class UnknownAgentError(CalmrunError):
    """An agent reference is neither a registered name nor an importable ``module:attr``.

    Attributes:
        ref: the reference asked for.
        registered: the names registered in the agent registry.
    """

    def __init__(self, ref: str, registered: list[str], detail: str = "") -> None:
        names = ", ".join(sorted(registered)) or "none"
        why = f": {detail}" if detail else ""
        super().__init__(f"unknown agent {ref!r}{why} (registered agents: {names}; or use 'module:attr')")
        self.ref = ref
        self.registered = sorted(registered)


class InvalidInputError(CalmrunError):
    """A step's input does not validate against its agent's input model; the same input fails again.

    Attributes:
        agent: the agent reference.
    """

    def __init__(self, agent: str, detail: str) -> None:
        super().__init__(f"agent {agent!r}: invalid input: {detail}")
        self.agent = agent


class InvalidOutputError(CalmrunError):
    """An agent's output does not validate against its output model; models vary, so a retry may succeed.

    Attributes:
        agent: the agent reference.
    """

    retriable: ClassVar[bool] = True

    def __init__(self, agent: str, detail: str) -> None:
        super().__init__(f"agent {agent!r}: invalid output: {detail}")
        self.agent = agent


class ProviderError(CalmrunError):
    """A model provider's API failed; whether a retry may help depends on the status.

    Attributes:
        provider: the provider (``openai``, ``function``...) or model name.
        status: the HTTP status, or None for a connection failure or a non-HTTP error.
        retriable: set per instance: 408, 409, 429, 5xx and connection failures are retriable.
    """

    retriable: ClassVar[bool] = True

    def __init__(self, provider: str, *, status: int | None, retriable: bool, detail: str = "") -> None:
        code = f"status {status}" if status is not None else "no status"
        super().__init__(f"model provider {provider!r} failed ({code}){': ' + detail if detail else ''}")
        self.provider = provider
        self.status = status
        # The class default is True; this instance's own value shadows it (read as exc.retriable).
        vars(self)["retriable"] = retriable


class UnknownWorkflowError(CalmrunError):
    """A run request names a workflow this worker does not run."""

    def __init__(self, workflow: str, known: list[str]) -> None:
        super().__init__(f"unknown workflow {workflow!r}; this worker runs {sorted(known)}")
        self.workflow = workflow
        self.known = known


class WorkerError(CalmrunError):
    """The worker cannot go on (a produce failed after its retries); uncommitted input is re-delivered."""


class CostsNotCurrentError(CalmrunError):
    """The cost totals did not cover the events topic's end in time (is a cost aggregator running?).

    Attributes:
        prefix: the topic prefix.
        lag: events not yet folded when the wait ended.
        wait_s: how long it waited.
    """

    retriable: ClassVar[bool] = True

    def __init__(self, *, prefix: str, lag: int, wait_s: float) -> None:
        super().__init__(
            f"the cost totals of {prefix!r} are still {lag} events behind after {wait_s:g}s "
            "(start one with `calmrun costs-aggregator`)"
        )
        self.prefix, self.lag, self.wait_s = prefix, lag, wait_s

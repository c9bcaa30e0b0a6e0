"""One exception hierarchy for calmrun: every error a caller may act on derives from CalmrunError."""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorKind(enum.StrEnum):
    """The stable names of the failures a run records (``error_type`` of results, events, states, dead
    letters). The decider matches on these, never on a class name: renaming a class changes nothing.
    The values are the names calmrun has always written, so older histories read the same."""

    AGENT_TIMEOUT = "AgentTimeout"  # the attempt did not finish within its step's timeout (retriable)
    INVALID_OUTPUT = "InvalidOutputError"  # the output does not validate (escalates on invalid_output)
    INVALID_INPUT = "InvalidInputError"
    INPUT_MAPPING = "InputMappingError"  # a step's input names a field the run does not have
    OVER_BUDGET = "OverBudget"  # the next attempt would take the run past its budget
    TENANT_BUDGET = "TenantBudgetExceeded"  # a new run refused: its tenant spent its window's budget
    STUCK_RUN = "StuckRun"  # nothing active and no outcome (a join waits for a step that never ran)
    DEADLINE_EXCEEDED = "DeadlineExceeded"  # written before 0.2, when a lost task cost an attempt
    WAIT_TIMEOUT = "WaitTimeout"  # an approval/wait step without on_timeout got no answer in time
    INVALID_ROUTE = "InvalidRoute"  # an agent chose a route outside its step's `route.allowed`
    LOOP_EXHAUSTED = "LoopExhausted"  # a loop reached max_iterations and has no on_exhausted
    CHILD_FAILED = "ChildFailed"  # a child run ended other than completed and its step has no on_failure
    NON_DETERMINISTIC_AGENT = "NonDeterministicAgent"  # a resumed agent made another call than its journal
    TOOL_APPROVAL_PENDING = "ToolApprovalPending"  # an agent's tool call waits for a person: the step waits


class CalmrunError(Exception):
    """Base of every calmrun error.

    Attributes:
        retriable: whether repeating the same operation may succeed.
        kind: the name a run records for this failure, when it has a stable one (else the class name).
    """

    retriable: ClassVar[bool] = False
    kind: ClassVar[ErrorKind | None] = None


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


class DevJaegerError(CalmrunError):
    """The local trace receiver (Jaeger, ``calmrun.devjaeger``) could not be built or started."""


class DevRegistryError(CalmrunError):
    """The local Schema Registry (Apicurio, ``calmrun.devregistry``) could not be built or started."""


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


class LimitExceededError(DecodeError):
    """A record from Kafka is over one of the limits in ``settings.limits``; it is refused, never parsed.

    Attributes:
        limit: the setting that refused it (``max_request_bytes``, ``max_json_depth``...).
        actual: the size the record has (at least this much; scanning stops at the first excess).
        maximum: the configured limit.
    """

    def __init__(self, limit: str, *, actual: int, maximum: int, what: str = "record") -> None:
        super().__init__(f"{what} is over limits.{limit}: {actual:,} > {maximum:,}")
        self.limit = limit
        self.actual = actual
        self.maximum = maximum


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

    kind: ClassVar[ErrorKind | None] = ErrorKind.INVALID_INPUT

    def __init__(self, agent: str, detail: str) -> None:
        super().__init__(f"agent {agent!r}: invalid input: {detail}")
        self.agent = agent


class InvalidOutputError(CalmrunError):
    """An agent's output does not validate against its output model; models vary, so a retry may succeed.

    Attributes:
        agent: the agent reference.
    """

    retriable: ClassVar[bool] = True
    kind: ClassVar[ErrorKind | None] = ErrorKind.INVALID_OUTPUT

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


class UnknownRunError(CalmrunError):
    """A record answers a run this worker does not know (a step result for a run never started).

    Attributes:
        run_id: the run the record names.
    """

    def __init__(self, run_id: str, detail: str = "") -> None:
        super().__init__(f"no run {run_id!r} is known here" + (f": {detail}" if detail else ""))
        self.run_id = run_id


class WorkerError(CalmrunError):
    """The worker cannot go on (a produce failed after its retries); uncommitted input is re-delivered."""


class WriterBrokenError(WorkerError):
    """A writer's producer stopped sending (aiokafka's sender routine ended, e.g. on a connection closed by a
    dying broker mid-lookup): the worker takes its partitions over again with a new producer."""

    retriable: ClassVar[bool] = True

    def __init__(self, writer: str, cause: BaseException | None) -> None:
        super().__init__(f"writer {writer}: its transactional producer stopped sending ({cause!r})")
        self.writer = writer


class KafkaAuthError(CalmrunError):
    """The broker refused this client's connection: TLS, SASL or the protocol itself does not match.

    Raised when a client starts, within seconds; a restart with the same settings fails the same way.

    Attributes:
        broker: the ``host:port`` that refused.
        mechanism: what was tried: ``TLS``, ``mTLS``, a SASL mechanism (``SASL_SSL/SCRAM-SHA-512``) or
            ``PLAINTEXT``.
        detail: what was refused (never holds a password).
    """

    def __init__(self, broker: str, *, mechanism: str, detail: str) -> None:
        super().__init__(f"Kafka broker {broker} refused the connection ({mechanism}): {detail}")
        self.broker = broker
        self.mechanism = mechanism
        self.detail = detail


class KafkaAuthorizationError(CalmrunError):
    """An ACL denies this client an operation on a topic, group or transactional ID.

    Attributes:
        resource: the kind (``topic``, ``group``, ``transactional_id``, ``cluster``).
        name: the resource's name (a topic name for ``topic``).
        principal: who asked, when known (``User:alice``), else "".
    """

    def __init__(self, resource: str, name: str, *, principal: str = "", detail: str = "") -> None:
        who = f" for {principal}" if principal else ""
        why = f": {detail}" if detail else ""
        super().__init__(
            f"not authorized{who} on {resource} {name!r}{why} (`calmrun acls` prints the ACLs a prefix needs)"
        )
        self.resource = resource
        self.name = name
        self.principal = principal


class InputMappingError(CalmrunError):
    """A step's input mapping names a field that the run input or earlier outputs do not have."""

    kind: ClassVar[ErrorKind | None] = ErrorKind.INPUT_MAPPING


class ReplayError(CalmrunError):
    """A replay cannot start: no definition for the run's workflow, an unreadable history.

    Attributes:
        run_id: the run, when the error concerns one.
    """

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class ReplayArgumentError(CalmrunError):
    """Bad replay arguments (unknown topic, offset out of range, empty range); nothing was written."""


class SnapshotError(CalmrunError):
    """A snapshot cannot be made or read: unknown run, unreadable file.

    Attributes:
        run_id: the run asked for, when known.
    """

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class DevModelError(CalmrunError):
    """The local model could not be installed, started or stopped; the message says what to do."""


class RunsNotFinishedError(CalmrunError):
    """Runs a client waited for did not all finish in time.

    Attributes:
        wait_s: how long it waited.
        counts: the runs that did not finish, by status (``not started`` for no state at all).
    """

    retriable: ClassVar[bool] = True

    def __init__(self, total: int, wait_s: float, counts: dict[str, int], hint: str = "") -> None:
        super().__init__(f"{total} runs not all finished within {wait_s:.0f}s: {counts}{hint}")
        self.wait_s = wait_s
        self.counts = dict(counts)


class TopicMissingError(CalmrunError):
    """A topic calmrun reads does not exist (yet).

    Attributes:
        topic: the topic's name.
    """

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic} does not exist (run `calmrun topics create`?)")
        self.topic = topic


class UiAccessError(ConfigError):
    """The operator page would be reachable off loopback without authentication: it refuses to start.

    Attributes:
        host: the address it was asked to listen on.
    """

    def __init__(self, host: str) -> None:
        super().__init__(
            f"calmrun ui on {host} (not loopback) needs authentication: give --token, ui.users "
            "(tokens with roles) or ui.trusted_header (a reverse proxy's user header) in the configuration"
        )
        self.host = host


class PoisonStormError(WorkerError):
    """Every record of a long run in a row, on every partition, was poison: a bug of ours, not bad input.

    Attributes:
        count: consecutive poison records.
        last_error: the type name of the last record's error.
    """

    def __init__(self, count: int, last_error: str) -> None:
        super().__init__(
            f"{count} consecutive records on all partitions were poison (last: {last_error}); this is a bug "
            "in calmrun or in this worker's workflows, not bad input: stopping rather than park everything "
            "(limits.max_consecutive_poison)"
        )
        self.count = count
        self.last_error = last_error


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


class RegistryError(CalmrunError):
    """The Schema Registry did not answer, or refused a request.

    Attributes:
        url: the registry's base URL.
        status: the HTTP status, or None when it did not answer.
        code: the registry's ``error_code`` (40401: subject not found, 40403: schema not found...), or None.
        detail: the registry's message (never holds a password).
    """

    retriable: ClassVar[bool] = True

    def __init__(self, url: str, *, status: int | None, code: int | None = None, detail: str = "") -> None:
        said = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"Schema Registry {url}: {said}: {detail}")
        self.url, self.status, self.code, self.detail = url, status, code, detail
        # a refusal (4xx) repeats the same way; no answer or a 5xx may pass
        vars(self)["retriable"] = status is None or status >= 500


class RegistryAuthError(RegistryError):
    """The registry refused our credentials (401) or this user the operation (403).

    Attributes:
        user: the basic-auth user sent, or None when none was configured.
    """

    def __init__(self, url: str, *, status: int, user: str | None, detail: str = "") -> None:
        who = f"user {user!r}" if user else "no credentials (wire.registry.username/password unset)"
        what = "refused the credentials of" if status == 401 else "denied the operation to"
        super().__init__(url, status=status, detail=f"{what} {who}: {detail}")
        self.user = user


class SchemaIncompatibleError(RegistryError):
    """A calmrun schema is not compatible with the latest one under its subject, by the subject's rule.

    Attributes:
        subject: the subject checked.
        messages: the registry's reasons.
    """

    def __init__(self, url: str, *, subject: str, messages: list[str]) -> None:
        why = "; ".join(messages) or "no reason given"
        super().__init__(url, status=409, detail=f"schema incompatible with subject {subject!r}: {why}")
        self.subject, self.messages = subject, messages


class NonDeterministicAgentError(CalmrunError):
    """A resumed agent made a different call than its journal holds at that position.

    The attempt fails; the step's retry policy decides what follows. A retry is a new attempt, which
    starts with an empty journal, so it may succeed (retriable); with no retries left the run is quarantined.

    Attributes:
        run_id: the run.
        step: the step.
        attempt: the attempt whose journal disagrees.
        position: the journal position (0 = the agent's first call).
        recorded: the call the journal holds there.
        made: the call the agent made instead.
    """

    retriable: ClassVar[bool] = True
    kind: ClassVar[ErrorKind | None] = ErrorKind.NON_DETERMINISTIC_AGENT

    def __init__(
        self, *, run_id: str, step: str, attempt: int, position: int, recorded: str, made: str
    ) -> None:
        super().__init__(
            f"run {run_id!r} step {step!r} attempt {attempt}: the agent's call at journal position "
            f"{position} is {made}, but the journal recorded {recorded}"
        )
        self.run_id, self.step, self.attempt = run_id, step, attempt
        self.position, self.recorded, self.made = position, recorded, made


class ToolApprovalPendingError(CalmrunError):
    """An agent called a tool that needs a person's approval: the attempt pauses, the step waits.

    Not a failure: the attempt's result carries the pending calls (``pending``: tool call ID, tool name,
    arguments), the decider sets the step ``waiting``, and ``calmrun approve``/``reject`` re-issue the same
    attempt with the answer (``StepTask.approvals``).
    """

    kind: ClassVar[ErrorKind | None] = ErrorKind.TOOL_APPROVAL_PENDING

    def __init__(self, step: str, pending: list[dict[str, Any]]) -> None:
        shown = ", ".join(f"{c['tool']} ({c['tool_call_id']})" for c in pending)
        super().__init__(f"step {step!r}: tool call {shown} waits for approval")
        self.step, self.pending = step, pending

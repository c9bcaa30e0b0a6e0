"""Configuration as frozen pydantic models, built once (in the CLI or by the caller) and passed down.

Sources, highest first: explicit arguments, ``CALMRUN_*`` environment variables (nested with ``__``, for
example ``CALMRUN_KAFKA__BOOTSTRAP``), a YAML file named by ``CALMRUN_CONFIG`` or ``--config``, defaults.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from calmrun.errors import ConfigError
from calmrun.eventloop import EventLoop
from calmrun.traceconfig import TracingSettings
from calmrun.wire.jsonfield import MAX_CONFIGURABLE_DEPTH, NUMBER_DIGITS_CEILING
from calmrun.wire.settings import WireSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


class TlsSettings(_Frozen):
    """TLS towards the brokers (``SSL`` and ``SASL_SSL``): whom to trust and, for mTLS, who we are.

    Files are PEM. Without ``ca_file`` the system's trust store is used (managed clusters with public CAs).
    """

    ca_file: Path | None = Field(None, description="PEM CA bundle the broker certificates must chain to")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mTLS; needs key_file")
    key_file: Path | None = Field(None, description="the client certificate's private key (PEM)")
    key_password: SecretStr | None = Field(
        None, description="password of an encrypted key_file: the value, env:NAME or file:PATH"
    )
    check_hostname: bool = Field(True, description="the broker certificate must name the host dialled")

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS needs both)")
        return self


class SaslSettings(_Frozen):
    """SASL login (``SASL_PLAINTEXT`` and ``SASL_SSL``).

    ``password`` is the value itself, ``env:NAME`` (read from that variable when a client starts) or
    ``file:PATH``, as model API keys are; it is never logged, written to a topic or exported.
    ``OAUTHBEARER`` takes ``oauth_token_provider: "module:attr"``: an ``aiokafka.abc.AbstractTokenProvider``
    instance, or a class or factory taking no arguments that returns one.
    """

    mechanism: SaslMechanism = "PLAIN"
    username: str | None = None
    password: SecretStr | None = None
    oauth_token_provider: str | None = Field(
        None, pattern=r"^[\w.]+:[\w.]+$", description="module:attr of an aiokafka AbstractTokenProvider"
    )


class SecuritySettings(_Frozen):
    """How calmrun authenticates to Kafka; applied to every client it starts (see calmrun.kafka.connect)."""

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl: SaslSettings = SaslSettings()
    tls: TlsSettings = TlsSettings()

    @model_validator(mode="after")
    def _complete(self) -> SecuritySettings:
        if self.protocol.startswith("SASL_"):
            if self.sasl.mechanism == "OAUTHBEARER":
                if self.sasl.oauth_token_provider is None:
                    raise ValueError("OAUTHBEARER needs sasl.oauth_token_provider (module:attr)")
            elif self.sasl.username is None or self.sasl.password is None:
                raise ValueError(
                    f"{self.protocol} with {self.sasl.mechanism} needs sasl.username and sasl.password"
                )
        return self


class KafkaSettings(_Frozen):
    """How to reach Kafka and how calmrun's topics are named and sized."""

    bootstrap: str = "127.0.0.1:9092"
    prefix: str = Field("calmrun", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    partitions: int = Field(
        4, ge=1, description="partitions of every calmrun topic (all equal: co-partitioned)"
    )
    replication_factor: int | None = Field(None, ge=1, description="unset: the cluster's (docs/cluster.md)")
    min_insync_replicas: int | None = Field(None, ge=1, description="unset: 2 where RF >= 3")
    replication_check: Literal["refuse", "warn"] = Field("refuse", description="on a topic at risk")
    group_id: str | None = Field(
        None, description="consumer group of the workers; default '<prefix>.workers'"
    )
    acks: Literal["all", "1", "0"] = "all"
    idempotence: bool = True
    linger_ms: int = Field(1, ge=0, description="producer batching delay; each hop waits up to this")
    txn_busy_retry_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="how soon a worker's transaction refused while the broker still ends the last one "
        "(CONCURRENT_TRANSACTIONS) is tried again; process-wide (docs/performance.md, section 1)",
    )
    txn_lanes: Literal[1, 2] = Field(
        2,
        description="transactional producers a writer writes in turn, so that a transaction "
        "need not wait for the broker to end the last one and the next is sent while the last commits "
        "(docs/performance.md, section 1)",
    )
    txn_ahead_ms: float = Field(
        250.0,
        ge=0,
        le=10_000,
        description="with two lanes: how long the transaction begun on the other lane while a commit is on "
        "its way, with the committing one's partitions added, waits for a decision before it is aborted; "
        "0: none is begun ahead",
    )
    client_id: str = "calmrun"
    security: SecuritySettings = SecuritySettings()
    max_request_size: int = Field(
        1_048_576,
        ge=65_536,
        description="largest record batch a calmrun producer sends (the client's max_request_size); "
        "raise it together with the broker's message.max.bytes",
    )


class LivenessSettings(_Frozen):
    """Failover faster than the session timeout: workers beat on a topic and remove a silent peer from the
    group (``calmrun.streams.liveness``; docs/performance.md#recovery)."""

    enabled: bool = Field(
        True,
        description="beat every interval_s and remove a peer silent for dead_after_s from the group; off: a "
        "killed worker's partitions move after its session timeout (every worker of a group alike)",
    )
    interval_s: float = Field(0.25, gt=0, le=5, description="how often a worker writes its liveness beat")
    dead_after_s: float = Field(
        1.0,
        gt=0,
        description="a peer that wrote no beat for this long, while this worker's own beats kept arriving, "
        "is removed from the group (a live one so removed is fenced and rejoins: a rebalance)",
    )

    @model_validator(mode="after")
    def _beats_per_window(self) -> LivenessSettings:
        if self.dead_after_s < 3 * self.interval_s:
            raise ValueError("dead_after_s must be at least 3 interval_s (several beats per window)")
        return self


class WorkerSettings(_Frozen):
    """How a worker runs steps: concurrency, commit cadence, durable deadlines."""

    max_in_flight: int = Field(100, ge=1, description="step tasks running at once in one worker")
    event_loop: EventLoop = Field(
        "auto",
        description="the worker process's event loop: auto (uvloop if installed), uvloop, asyncio "
        "(calmrun.eventloop)",
    )
    max_unacked: int = Field(
        2_000,
        ge=1,
        description="decisions whose records are not yet acknowledged; above this the worker stops fetching",
    )
    eager: bool = Field(
        True,
        description="run a task this worker just scheduled at once (Temporal's eager activity execution); "
        "off, every task is written and read back",
    )
    early: bool = Field(True, description="start a task decided from a re-delivered input before it commits")
    task_records: Literal["auto"] | bool = Field(
        "auto",
        description="write a task record for the steps this worker runs itself (eagerly) too; false: none is "
        "written, and a new owner starts the attempts a restored state awaits (a run moves 7 records fewer); "
        "auto: none while every member of the group resumes from states (this version or later), every one "
        "while an older worker is in the group (docs/performance.md, section 4); a pool's tasks are always "
        "written",
    )
    inline_wait_ms: float = Field(5.0, ge=0, description="how long a commit waits for tasks started early")
    busy_linger_ms: float = Field(
        10.0,
        ge=0,
        description="after a transaction of at least busy_linger_from decisions, how long the writer "
        "waits before it begins the next one, so that more decisions share it (0: no wait)",
    )
    busy_linger_from: int = Field(
        8, ge=1, description="decisions in a transaction from which the writer lingers (busy_linger_ms)"
    )
    commit_interval_s: float = Field(1.0, gt=0)
    timer_interval_s: float = Field(0.2, gt=0, description="how often due retries and deadlines are checked")
    session_timeout_s: float = Field(
        6.0,
        ge=6,
        description="a worker silent this long leaves the group and its partitions move (6 s is the "
        "broker's default minimum); heartbeats go every second",
    )
    instance_id: str | None = Field(
        None,
        description="static group membership (KIP-345): a stable name per worker (a pod name); a worker "
        "restarted under the same name within the session timeout gets its partitions back without a "
        "rebalance of the group; its writer's transactional id is the name's, so that the restart fences the "
        "process before it",
    )
    liveness: LivenessSettings = LivenessSettings()
    gc_threshold: int = Field(
        10_000,
        ge=0,
        description="a worker process freezes its startup heap and collects young objects after this many "
        "allocations (CPython: 700); 0 leaves the garbage collector alone",
    )
    deadline_grace_s: float = Field(
        30.0,
        ge=0,
        description="a task's result may arrive this long after its timeout before the same attempt is "
        "issued again (a lost task; the attempt's own timeout is reported by the attempt)",
    )


class LimitsSettings(_Frozen):
    """What one record may hold; what is over a limit is refused with its cause, never half-processed.

    A request over a limit goes to ``<prefix>.dlq._invalid`` (or its workflow's DLQ); a step output over
    ``max_output_bytes`` (or deeper than ``max_json_depth``) fails that attempt as an invalid output.
    """

    max_request_bytes: int = Field(
        262_144, ge=1_024, description="key + value + headers of one run request, in bytes"
    )
    max_json_depth: int = Field(
        64,
        ge=2,
        le=MAX_CONFIGURABLE_DEPTH,
        description="nesting of arrays and objects in JSON input or output",
    )
    max_number_digits: int = Field(
        1_000, ge=20, le=NUMBER_DIGITS_CEILING, description="characters of one JSON number literal"
    )
    max_output_bytes: int = Field(16_384, ge=256, description="one step output, as JSON")
    max_steps_per_run: int = Field(32, ge=1, description="steps of one workflow (each runs once per run)")
    max_fan_out: int = Field(16, ge=1, description="steps one step may start at once")
    max_map_elements: int = Field(10_000, ge=1, description="the widest list a map step may declare")
    max_attempts_per_run: int = Field(
        1_000, ge=1, description="attempts of all steps of one run; a redrive past it is refused"
    )
    dlq_max_payload_bytes: int = Field(
        65_536,
        ge=1_024,
        le=524_288,
        description="key + headers + value copied into a dead-letter record; more is cut, with its "
        "length and SHA-256",
    )
    max_consecutive_poison: int = Field(
        100,
        ge=1,
        description="records in a row, on all partitions, that failed with an unexpected error (a bug, "
        "not bad input) before the worker stops",
    )


class AliasThrottle(_Frozen):
    """What one worker may send to one model alias; unset fields do not limit."""

    max_concurrency: int | None = Field(None, ge=1, description="attempts of this alias running at once")
    requests_per_minute: float | None = Field(
        None,
        gt=0,
        description="attempt starts per minute, spaced evenly (model requests past an attempt's "
        "first count when it finishes)",
    )
    requests_burst: int = Field(1, ge=1, description="starts allowed at once before the spacing applies")
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="tokens (in + out) per minute, counted from finished attempts' usage: no "
        "attempt starts while the last minute's tokens are over it",
    )


class StepThrottle(_Frozen):
    """What one worker may run of one step at once."""

    max_concurrency: int = Field(ge=1, description="attempts of this step running at once")


class ThrottleSettings(_Frozen):
    """Limits per model alias and per step in one worker, applied before an agent starts (calmrun.streams.
    throttle); a task waiting for one holds no ``max_in_flight`` slot, and its wait is its queue wait."""

    models: dict[str, AliasThrottle] = Field(default_factory=dict, description="model alias -> limits")
    steps: dict[Annotated[str, Field(pattern=r"^[^/]+/[^/]+$")], StepThrottle] = Field(
        default_factory=dict, description="'<workflow>/<step>' -> limits"
    )
    retry_after_default_s: float = Field(
        10.0, ge=0, description="how long a 429 without Retry-After pauses its alias on this worker"
    )
    max_pause_s: float = Field(300.0, gt=0, description="the longest pause a Retry-After can ask for")
    max_waiting: int = Field(
        1_000, ge=1, description="tasks waiting for a limit before the worker stops fetching"
    )


class MetricsSettings(_Frozen):
    """The Prometheus ``/metrics`` endpoint of a worker (0 disables it)."""

    port: int = 0
    host: str = "127.0.0.1"


class ModelAlias(_Frozen):
    """One model alias: what it resolves to and the settings passed to pydantic-ai.

    ``model`` is a pydantic-ai model name (``openai:gpt-4o-mini``, ``anthropic:claude-...``), ``test``
    (pydantic-ai's TestModel) or ``function:module:attr`` (a FunctionModel around that function).
    """

    model: str
    base_url: str | None = None
    api_key: SecretStr | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float | None = None
    output_mode: Literal["tool", "native", "prompted"] | None = None
    price_in_per_mtok: Decimal | None = None
    price_out_per_mtok: Decimal | None = None


Window = Literal["1m", "1h", "1d"]
"""A tumbling cost window: one minute, one hour or one day (aligned to the epoch, UTC)."""


class PriceSettings(_Frozen):
    """Prices that are not a model's tokens: downstream API calls, per call, by the kind an agent names.

    ``ctx.count_api_call(kind="payments")`` is priced at ``api_calls["payments"]``; a kind without a price
    costs nothing (and is still counted). Model token prices come from genai-prices, or from the alias's
    ``price_in_per_mtok`` / ``price_out_per_mtok`` when set (self-hosted or negotiated).
    """

    api_calls: dict[str, Decimal] = Field(default_factory=dict, description="API kind -> USD per call")


class TenantBudget(_Frozen):
    """What one tenant may spend per tumbling window; new runs are refused once it is spent."""

    usd: Decimal = Field(ge=0)
    window: Window = "1h"


class BudgetSettings(_Frozen):
    """Budgets per tenant (per window). Run budgets come with the request or the workflow."""

    tenants: dict[str, TenantBudget] = Field(default_factory=dict)


class CostSettings(_Frozen):
    """The cost aggregator (``calmrun costs-aggregator``): its group, batches and window retention."""

    app_id: str | None = Field(None, description="the aggregator's consumer group; default '<prefix>-costs'")
    emit_interval_s: float = Field(
        0.2, gt=0, description="longest wait for events before a batch (and its transaction) is written"
    )
    max_batch: int = Field(20_000, ge=1, description="most events folded into one transaction")
    retention_s: dict[Window, int] = Field(
        default_factory=lambda: {"1m": 6 * 3600, "1h": 7 * 86400, "1d": 90 * 86400},  # type: ignore[arg-type]
        description="how long the buckets of each window are kept (seconds)",
    )
    session_timeout_s: float = Field(10.0, ge=6, description="consumer group session timeout")


UiRole = Literal["viewer", "operator"]
"""viewer: read only, payloads redacted; operator: also acts (approve, reject, signal, cancel, redrive)."""


class UiUser(_Frozen):
    """One user of the operator page, identified by a bearer token."""

    token: SecretStr
    role: UiRole = "viewer"


class UiSettings(_Frozen):
    """The operator page (``calmrun ui``): where it listens and who may do what.

    Off loopback the page refuses to start unless ``users`` or ``trusted_header`` is configured.
    """

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    users: dict[str, UiUser] = Field(default_factory=dict, description="user name -> token and role")
    trusted_header: str | None = Field(
        None, description="a reverse proxy that authenticated the user puts the user name in this header"
    )
    header_roles: dict[str, UiRole] = Field(
        default_factory=dict, description="roles of users named by trusted_header (others: viewer)"
    )
    index_path: Path | None = Field(
        None, description="the SQLite index file (rebuilt at start); default a temporary file"
    )


class Settings(BaseSettings):
    """Everything configurable in calmrun."""

    model_config = SettingsConfigDict(
        env_prefix="CALMRUN_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    metrics: MetricsSettings = MetricsSettings()
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    prices: PriceSettings = PriceSettings()
    budgets: BudgetSettings = BudgetSettings()
    costs: CostSettings = CostSettings()
    redact: list[Annotated[str, Field(pattern=r"^(input(\.[^.]+)+|steps\.[^.]+(\.[^.]+)+)$")]] = Field(
        default_factory=list,
        description="fields masked in events, dead letters, snapshots and logs (calmrun.redact): "
        "input.<field>... or steps.<step>.<field>...",
    )
    ui: UiSettings = UiSettings()
    limits: LimitsSettings = LimitsSettings()
    throttle: ThrottleSettings = ThrottleSettings()
    wire: WireSettings = WireSettings()
    tracing: TracingSettings = TracingSettings()

    @property
    def group_id(self) -> str:
        return self.kafka.group_id or f"{self.kafka.prefix}.workers"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from a YAML file (optional), the environment and explicit overrides.

    Raises:
        ConfigError: the file is missing or invalid; the message names the file and the field.
    """
    data: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{config}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config}: expected a mapping at the top level")
        data = loaded or {}
    try:
        # raw values, validated once below with the file's: an alias may be completed from the environment
        env: dict[str, Any] = EnvSettingsSource(Settings)()
        return Settings.model_validate(_deep_merge(_deep_merge(data, env), overrides))
    except ValidationError as exc:
        where = f"{config}: " if config else ""
        raise ConfigError(f"{where}invalid configuration: {_describe(exc)}") from exc


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())

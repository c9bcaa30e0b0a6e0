"""Configuration as frozen pydantic models, built once (in the CLI or by the caller) and passed down.

Sources, highest first: explicit arguments, ``CALMRUN_*`` environment variables (nested with ``__``, for
example ``CALMRUN_KAFKA__BOOTSTRAP``), a YAML file named by ``CALMRUN_CONFIG`` or ``--config``, defaults.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from calmrun.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    """How to reach Kafka and how calmrun's topics are named and sized."""

    bootstrap: str = "127.0.0.1:9092"
    prefix: str = Field("calmrun", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    partitions: int = Field(
        4, ge=1, description="partitions of every calmrun topic (all equal: co-partitioned)"
    )
    replication_factor: int = Field(1, ge=1)
    group_id: str | None = Field(
        None, description="consumer group of the workers; default '<prefix>.workers'"
    )
    acks: Literal["all", "1", "0"] = "all"
    idempotence: bool = True
    linger_ms: int = Field(1, ge=0, description="producer batching delay; each hop waits up to this")
    client_id: str = "calmrun"


class WorkerSettings(_Frozen):
    """How a worker runs steps: concurrency, commit cadence, durable deadlines."""

    max_in_flight: int = Field(100, ge=1, description="step tasks running at once in one worker")
    max_unacked: int = Field(
        2_000,
        ge=1,
        description="decisions whose records are not yet acknowledged; above this the worker stops fetching",
    )
    eager: bool = Field(
        True,
        description="run a task this worker just scheduled at once; its record is still written and its "
        "echo recognised (Temporal's eager activity execution)",
    )
    commit_interval_s: float = Field(1.0, gt=0)
    timer_interval_s: float = Field(0.2, gt=0, description="how often due retries and deadlines are checked")
    session_timeout_s: float = Field(
        30.0, ge=6, description="a worker silent this long leaves the group and its partitions move"
    )
    gc_threshold: int = Field(
        10_000,
        ge=0,
        description="a worker process freezes its startup heap and collects young objects after this many "
        "allocations (CPython: 700); 0 leaves the garbage collector alone",
    )
    deadline_grace_s: float = Field(
        30.0,
        ge=0,
        description="a task's result may arrive this long after its timeout before it is re-issued",
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

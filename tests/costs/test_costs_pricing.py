"""Pricing: configured overrides, genai-prices for known provider models, API calls by kind; Decimal money."""

from __future__ import annotations

import logging
from decimal import Decimal

from calmrun.agents import StepContext
from calmrun.costs.pricing import Pricing, genai_prices_version
from calmrun.settings import ModelAlias, PriceSettings
from calmrun.workflow.events import StepTask

MODELS = {
    "local": ModelAlias(
        model="openai:llama3",
        base_url="http://localhost:11434/v1",
        price_in_per_mtok=Decimal("0.2"),
        price_out_per_mtok=Decimal("0.4"),
    ),
    "mini": ModelAlias(model="openai:gpt-4o-mini"),
    "selfhosted": ModelAlias(model="openai:gpt-4o-mini", base_url="http://gpu-box:8000/v1"),
    "scripted": ModelAlias(model="function:examples.triage.scripted:fast"),
    "unknown": ModelAlias(model="openai:no-such-model-anywhere"),
}


def test_configured_prices_win_and_are_exact() -> None:
    p = Pricing(MODELS).price("local", 1_000_000, 500_000)
    assert p.usd == Decimal("0.4") and isinstance(p.usd, Decimal)
    assert p.source == "config models.local"


def test_genai_prices_for_a_known_provider_model() -> None:
    p = Pricing(MODELS).price("mini", 1000, 500)
    assert p.usd == Decimal("0.00045")  # 0.15 and 0.60 USD per million tokens
    assert p.source == f"genai-prices {genai_prices_version()} openai/gpt-4o-mini"


def test_unpriceable_models_cost_nothing_and_say_so() -> None:
    pricing = Pricing(MODELS)
    for alias in ("selfhosted", "scripted", "unknown", "not-configured"):
        p = pricing.price(alias, 1000, 1000)
        assert p.usd == 0
        assert p.source is not None and p.source.startswith(f"unpriced {alias}")


def test_api_calls_are_priced_per_kind() -> None:
    pricing = Pricing(
        MODELS, PriceSettings(api_calls={"payments": Decimal("0.01"), "search": Decimal("0.002")})
    )
    p = pricing.price("local", 0, 0, {"payments": 3, "search": 2, "free": 7})
    assert p.usd == Decimal("0.034")
    assert p.source == "config models.local; config prices.api_calls"


def test_step_context_counts_calls_by_kind_and_prices_its_cost() -> None:
    task = StepTask(
        run_id="r",
        workflow="w",
        version="1",
        step="s",
        attempt=1,
        agent="a",
        model="local",
        issued_ms=0,
        timeout_s=1,
    )
    from calmrun.agents import ModelRegistry

    ctx = StepContext.for_task(task, ModelRegistry(MODELS), logging.getLogger("t"))
    ctx.count_api_call()
    ctx.count_api_call(2, kind="payments")
    ctx.tokens_in, ctx.tokens_out = 1_000_000, 0
    cost = ctx.cost(1.0, 0.0, Pricing(MODELS, PriceSettings(api_calls={"payments": Decimal("0.5")})))
    assert cost.api_calls == 3
    assert cost.cost_usd == Decimal("1.2")
    assert ctx.cost(1.0, 0.0).cost_usd == 0  # no pricing: no money

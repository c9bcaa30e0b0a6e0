"""Money for one step attempt: model tokens priced by genai-prices or configuration, API calls by kind.

Precedence for a model alias: the alias's ``price_in_per_mtok`` / ``price_out_per_mtok`` (self-hosted or
negotiated prices) win; otherwise the alias's ``provider:model`` is looked up in genai-prices (the pydantic
team's maintained price database, its bundled snapshot: no network); an alias with a ``base_url`` is
self-hosted and is never looked up. What cannot be priced costs 0 and says so in its source. Every figure
carries its ``price_source`` (``genai-prices 0.2.3 openai/gpt-4o-mini``, ``config models.fast``,
``config prices.api_calls``, ``unpriced test``), so a later replay can explain a difference.

Money is ``Decimal`` throughout, never a float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

from calmrun.settings import ModelAlias, PriceSettings, Settings

MTOK = Decimal(1_000_000)
ZERO = Decimal(0)


def genai_prices_version() -> str:
    """The installed genai-prices version (recorded with every figure it priced)."""
    import genai_prices

    return str(genai_prices.__version__)


@dataclass(frozen=True)
class Price:
    """The money of one attempt and where each part of it came from."""

    usd: Decimal
    source: str | None


@dataclass(frozen=True)
class _TokenRate:
    """How an alias's tokens are priced: fixed per-million rates, genai-prices, or not at all."""

    source: str
    per_mtok_in: Decimal | None = None
    per_mtok_out: Decimal | None = None
    provider: str | None = None
    model_ref: str | None = None


class Pricing:
    """Prices step attempts from model aliases and API-call kinds.

    Args:
        models: alias -> configuration (``Settings.models``).
        prices: per-call prices of API kinds (``Settings.prices``).
    """

    def __init__(self, models: Mapping[str, ModelAlias], prices: PriceSettings | None = None) -> None:
        self._models = dict(models)
        self._api = dict((prices or PriceSettings()).api_calls)
        self._rates: dict[str, _TokenRate] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Pricing:
        return cls(settings.models, settings.prices)

    def rate(self, alias: str | None) -> _TokenRate:
        """How tokens of ``alias`` are priced (cached per alias)."""
        key = alias or ""
        cached = self._rates.get(key)
        if cached is None:
            cached = self._rates[key] = self._rate(alias)
        return cached

    def _rate(self, alias: str | None) -> _TokenRate:
        if alias is None:
            return _TokenRate(source="unpriced (no model)")
        cfg = self._models.get(alias)
        if cfg is None:
            return _TokenRate(source=f"unpriced {alias} (not configured)")
        if cfg.price_in_per_mtok is not None or cfg.price_out_per_mtok is not None:
            return _TokenRate(
                source=f"config models.{alias}",
                per_mtok_in=cfg.price_in_per_mtok or ZERO,
                per_mtok_out=cfg.price_out_per_mtok or ZERO,
            )
        provider, sep, model_ref = cfg.model.partition(":")
        if not sep or cfg.base_url is not None or provider in ("function", "test"):
            return _TokenRate(source=f"unpriced {alias} ({cfg.model})")
        if _genai_lookup(provider, model_ref) is None:
            return _TokenRate(source=f"unpriced {alias} ({cfg.model} not in genai-prices)")
        return _TokenRate(
            source=f"genai-prices {genai_prices_version()} {provider}/{model_ref}",
            provider=provider,
            model_ref=model_ref,
        )

    def tokens(self, alias: str | None, tokens_in: int, tokens_out: int) -> Price:
        """The price of ``tokens_in`` input and ``tokens_out`` output tokens on ``alias``."""
        r = self.rate(alias)
        if r.per_mtok_in is not None and r.per_mtok_out is not None:
            return Price((r.per_mtok_in * tokens_in + r.per_mtok_out * tokens_out) / MTOK, r.source)
        if r.provider is not None and r.model_ref is not None:
            if tokens_in == 0 and tokens_out == 0:
                return Price(ZERO, r.source)
            return Price(_genai_price(r.provider, r.model_ref, tokens_in, tokens_out), r.source)
        return Price(ZERO, r.source)

    def api_calls(self, calls: Mapping[str, int]) -> Price:
        """The price of downstream API calls, ``kind -> count``."""
        usd = ZERO
        priced = False
        for kind, n in calls.items():
            each = self._api.get(kind)
            if each is not None and n:
                usd += each * n
                priced = True
        return Price(usd, "config prices.api_calls" if priced else None)

    def price(
        self, alias: str | None, tokens_in: int, tokens_out: int, calls: Mapping[str, int] | None = None
    ) -> Price:
        """Tokens plus API calls of one attempt; the source names both parts when both cost something."""
        tok = self.tokens(alias, tokens_in, tokens_out)
        if not calls:  # what the sum below makes of no calls, without adding them up
            return Price(tok.usd + ZERO, tok.source or None)
        api = self.api_calls(calls)
        sources = [s for s in (tok.source, api.source) if s]
        return Price(tok.usd + api.usd, "; ".join(sources) or None)


@lru_cache(maxsize=256)
def _genai_lookup(provider: str, model_ref: str) -> Any:
    from genai_prices import Usage, calc_price

    try:
        return calc_price(Usage(input_tokens=0, output_tokens=0), model_ref, provider_id=provider)
    except LookupError:
        return None


def _genai_price(provider: str, model_ref: str, tokens_in: int, tokens_out: int) -> Decimal:
    from genai_prices import Usage, calc_price

    calc = calc_price(
        Usage(input_tokens=tokens_in, output_tokens=tokens_out), model_ref, provider_id=provider
    )
    return Decimal(calc.total_price)

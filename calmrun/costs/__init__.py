"""The cost surface: pricing of step attempts, the cost aggregator, worker metrics, tenant spend."""

from calmrun.costs.pricing import Price, Pricing, genai_prices_version

__all__ = ["Price", "Pricing", "genai_prices_version"]

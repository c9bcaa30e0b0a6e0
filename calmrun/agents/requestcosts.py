"""Cost per request: each model request of an attempt, and the usage of agents its tools delegated to.

Read from the attempt's journal (``agents.journal``): a model request's entry holds its tokens, latency and
model; a tool call's entry holds the usage of the agents the tool ran with the caller's usage (pydantic-ai's
delegation: ``other.run(..., usage=ctx.usage)``), a row of its own (``delegated``). Money is the step alias's
price of each row's tokens, so the rows of an attempt add up to the tokens and the token money of its
``StepCost`` (API calls are priced per attempt and are not in the rows). Pure: no Kafka (reading a run's
journal is ``streams.journal.read_request_costs``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from calmrun.agents.journal import Claim, Entry, Part, chain, tasks
from calmrun.costs.pricing import Pricing


@dataclass(frozen=True)
class RequestCost:
    """One model request of an attempt (``model``) or the delegated usage of one tool call (``delegated``)."""

    step: str
    attempt: int
    position: int
    kind: Literal["model", "delegated"]
    model: str | None
    label: str
    tokens_in: int
    tokens_out: int
    requests: int
    latency_ms: float
    cost_usd: Decimal
    price_source: str | None


def request_costs(
    entries: Iterable[Entry], alias: str | None, pricing: Pricing | None = None
) -> list[RequestCost]:
    """The rows of these entries (one attempt's chain, or several), priced at ``alias``'s rates."""
    rows: list[RequestCost] = []
    for e in entries:
        u = e.usage
        if e.call.op != "model" and not (u.input_tokens or u.output_tokens or u.requests):
            continue
        price = pricing.tokens(alias, u.input_tokens, u.output_tokens) if pricing is not None else None
        rows.append(
            RequestCost(
                step=e.step,
                attempt=e.attempt,
                position=e.position,
                kind="model" if e.call.op == "model" else "delegated",
                model=e.model,
                label=e.call.label,
                tokens_in=u.input_tokens,
                tokens_out=u.output_tokens,
                requests=u.requests,
                latency_ms=e.latency_ms,
                cost_usd=price.usd if price is not None else Decimal(0),
                price_source=price.source if price is not None else None,
            )
        )
    return rows


@dataclass
class Totals:
    """Rows added up (per step or per model)."""

    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    cost_usd: Decimal = Decimal(0)

    def add(self, r: RequestCost) -> None:
        self.requests += r.requests
        self.tokens_in += r.tokens_in
        self.tokens_out += r.tokens_out
        self.latency_ms += r.latency_ms
        self.cost_usd += r.cost_usd


def totals(rows: Sequence[RequestCost], by: Literal["step", "model", "attempt"]) -> dict[str, Totals]:
    """The rows added up per step, per model (``-`` when unknown) or per ``step/attempt``."""
    out: dict[str, Totals] = {}
    for r in rows:
        key = r.step if by == "step" else (r.model or "-") if by == "model" else f"{r.step}/{r.attempt}"
        out.setdefault(key, Totals()).add(r)
    return out


def run_request_costs(records: Sequence[Entry | Claim | Part], pricing: Pricing | None) -> list[RequestCost]:
    """The rows of every attempt journaled in one run's ``records``, each priced at its task's alias."""
    rows: list[RequestCost] = []
    for key, task in tasks(records).items():
        rows.extend(request_costs(chain(records, key), task.get("model"), pricing))
    return rows

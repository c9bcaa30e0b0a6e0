"""Prometheus metrics of the agent journal: cost per model request, and what was replayed from the journal.

Counted when an attempt ends, for the units its incarnation ran live (``executed``): a unit answered from
the journal on resume was counted by the incarnation that ran it, if that one ended; it is counted in
``calmrun_agent_journal_replayed_total`` here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from calmrun.agents import StepContext
from calmrun.agents.requestcosts import request_costs
from calmrun.costs.pricing import Pricing


class RequestMetrics:
    """The journal's metrics in a worker's registry (``calmrun_agent_*``)."""

    def __init__(self, registry: CollectorRegistry, pricing: Pricing | None) -> None:
        self.pricing = pricing
        self.requests = Counter(
            "calmrun_agent_requests",
            "Model requests of agents (kind=model) and requests of agents their tools delegated to.",
            ["alias", "model", "kind"],
            registry=registry,
        )
        self.tokens = Counter(
            "calmrun_agent_request_tokens",
            "Tokens of agent requests.",
            ["alias", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "calmrun_agent_request_cost_usd", "Money of agent requests (USD).", ["alias"], registry=registry
        )
        self.latency = Histogram(
            "calmrun_agent_request_seconds", "Latency of one model request.", ["alias"], registry=registry
        )
        self.replayed = Counter(
            "calmrun_agent_journal_replayed",
            "Journal entries answered from the journal on resume instead of running again.",
            ["op"],
            registry=registry,
        )
        self.written = Counter(
            "calmrun_agent_journal_bytes", "Bytes written to the agent journal.", registry=registry
        )

    def observe(self, ctx: StepContext) -> None:
        """Count the journal of ``ctx``'s attempt (``agents.execute``'s ``on_journal``)."""
        journal = ctx.journal
        if journal is None:
            return
        alias = ctx.model_alias or "-"
        live = [e for e in journal.entries if e.incarnation == journal.incarnation]
        for e in journal.entries:
            if e.incarnation != journal.incarnation:
                self.replayed.labels(e.call.op).inc()
        for r in request_costs(live, ctx.model_alias, self.pricing):
            self.requests.labels(alias, r.model or "-", r.kind).inc(r.requests)
            self.tokens.labels(alias, "in").inc(r.tokens_in)
            self.tokens.labels(alias, "out").inc(r.tokens_out)
            self.cost.labels(alias).inc(float(r.cost_usd))
            if r.kind == "model":
                self.latency.labels(alias).observe(r.latency_ms / 1000)
        self.written.inc(journal.written_bytes)

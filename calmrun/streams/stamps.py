"""What a request is stamped with before the decider sees it: figures that live outside the run.

A tenant's spend in its budget window and the planner's observed figures per model alias both come from
the cost aggregator's output, which changes over time. The decider must not read them (it is pure), so
the worker stamps them on the ``RunRequested`` input once, when the run is first decided; the stamp is
recorded with the request, so replay reproduces the verdict and the choice exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from calmrun.costs.planner import StepStats
from calmrun.costs.spend import TenantSpend
from calmrun.settings import Settings
from calmrun.streams.ports import Known
from calmrun.workflow.definition import AgentStep, WorkflowDef
from calmrun.workflow.events import RunRequest, RunRequested


class Stamps:
    """Follows what the stamps are read from (only what the configuration and workflows need).

    Args:
        known: is this run already held here (a duplicate request gets no fresh stamp)?
    """

    def __init__(self, settings: Settings, workflows: Iterable[WorkflowDef], known: Known) -> None:
        self.settings, self._known = settings, known
        # tenant budgets need each tenant's spend in its window, from the cost aggregator's output
        self.tenant_spend = TenantSpend(settings) if settings.budgets.tenants else None
        # steps with `choose` start on a rung picked from the cost table's figures
        choosing = any(isinstance(sd, AgentStep) and sd.choose for wf in workflows for sd in wf.steps)
        self.step_stats = StepStats(settings) if choosing else None

    async def start(self) -> None:
        if self.tenant_spend is not None:
            await self.tenant_spend.start()
        if self.step_stats is not None:
            await self.step_stats.start()

    async def stop(self) -> None:
        if self.tenant_spend is not None:
            await self.tenant_spend.stop()
        if self.step_stats is not None:
            await self.step_stats.stop()

    def request(self, run_id: str, wf: WorkflowDef, body: RunRequest, at_ms: int) -> RunRequested:
        """The decider's input for a request, stamped with the tenant's spend and the planner's figures."""
        budget = self.settings.budgets.tenants.get(body.tenant)
        known = self._known.known(run_id)
        stats = self.step_stats.figures(wf, at_ms) if self.step_stats is not None and not known else None
        if budget is None or self.tenant_spend is None or known:
            return RunRequested(
                run_id,
                wf.name,
                body.input,
                at_ms,
                body.tenant,
                budget_usd=body.budget_usd,
                model_stats=stats,
                parent=body.parent,
            )
        return RunRequested(
            run_id,
            wf.name,
            body.input,
            at_ms,
            body.tenant,
            budget_usd=body.budget_usd,
            tenant_budget_usd=budget.usd,
            tenant_spent_usd=self.tenant_spend.spent(body.tenant, budget.window, at_ms),
            tenant_window=budget.window,
            model_stats=stats,
            parent=body.parent,
        )

"""Live replay: a run's original request runs again in a shadow namespace, and the two runs are compared.

The request (input, tenant, budget) is read from the run's ``run.requested`` event and submitted with the
same run ID under a shadow prefix, where an in-process worker runs it, optionally with other model
aliases (a models file) or another definition (another agent version). Production topics are never
written. The comparison is per step: output, attempts, latency, tokens, money; then the path and totals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.client import Client
from calmrun.errors import ReplayError
from calmrun.replay.recorded import path_of, pick_definition
from calmrun.replay.reproduce import Target
from calmrun.replay.snapshot import Snapshot, scan_runs
from calmrun.settings import Settings
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import RunEvent, RunRequest
from calmrun.workflow.state import RunState


@dataclass
class Side:
    """One step of one run (original or replay): every ``run`` attempt's cost added up."""

    status: str = "-"
    attempts: int = 0
    output: dict[str, Any] | None = None
    error: str | None = None
    model: str | None = None
    latency_ms: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: Decimal = Decimal(0)

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass
class StepComparison:
    step: str
    original: Side | None
    replay: Side | None

    @property
    def same_output(self) -> bool:
        a = self.original.output if self.original else None
        b = self.replay.output if self.replay else None
        return a == b


@dataclass
class Totals:
    latency_ms: float = 0.0
    tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    def add(self, s: Side) -> None:
        self.latency_ms += s.latency_ms
        self.tokens += s.tokens
        self.cost_usd += s.cost_usd


@dataclass
class LiveReplay:
    """A run and its live replay side by side."""

    run_id: str
    shadow: str
    original_status: str
    replay_status: str
    original_outcome: str | None
    replay_outcome: str | None
    original_path: list[str]
    replay_path: list[str]
    steps: list[StepComparison] = field(default_factory=list)
    original_total: Totals = field(default_factory=Totals)
    replay_total: Totals = field(default_factory=Totals)

    @property
    def same_path(self) -> bool:
        return self.original_path == self.replay_path

    @property
    def same_outputs(self) -> bool:
        return all(s.same_output for s in self.steps)

    @property
    def cost_delta_usd(self) -> Decimal:
        return self.replay_total.cost_usd - self.original_total.cost_usd

    @property
    def tokens_delta(self) -> int:
        return self.replay_total.tokens - self.original_total.tokens

    @property
    def latency_delta_ms(self) -> float:
        return self.replay_total.latency_ms - self.original_total.latency_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            same_path=self.same_path,
            same_outputs=self.same_outputs,
            cost_delta_usd=str(self.cost_delta_usd),
            tokens_delta=self.tokens_delta,
            latency_delta_ms=round(self.latency_delta_ms, 1),
        )
        out: dict[str, Any] = _jsonable(d)
        return out


def shadow_settings(settings: Settings, shadow: str) -> Settings:
    """``settings`` with the topic prefix (and so the consumer group) of the shadow namespace."""
    Target.parse(f"shadow:{shadow}", settings.kafka.prefix)
    kafka = settings.kafka.model_copy(update={"prefix": shadow, "group_id": None})
    return settings.model_copy(update={"kafka": kafka})


def request_of(snap: Snapshot) -> RunRequest:
    """The run's original request, rebuilt from its ``run.requested`` event.

    Raises:
        ReplayError: the history does not start with the run request.
    """
    if not snap.events or snap.events[0].type != "run.requested":
        raise ReplayError(f"run {snap.run_id!r}: no run.requested event is recorded", run_id=snap.run_id)
    e = snap.events[0]
    budget = e.data.get("budget_usd")
    return RunRequest(
        workflow=e.workflow,
        input=dict(e.data.get("input") or {}),
        run_id=snap.run_id,
        tenant=e.tenant,
        budget_usd=Decimal(str(budget)) if budget is not None else None,
    )


async def replay_live(
    settings: Settings,
    snapshots: Sequence[Snapshot],
    definitions: Sequence[WorkflowDef],
    agents: AgentRegistry,
    models: ModelRegistry,
    *,
    shadow: str,
    version: str | None = None,
    wait_s: float = 300.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[LiveReplay]:
    """Run ``snapshots``' requests again under the prefix ``shadow`` and compare each with its original.

    One in-process worker (group ``<shadow>.workers``) runs every replayed run; it is stopped before this
    returns. A shadow namespace that already holds one of these run IDs ignores the request as a duplicate
    (the earlier replay is compared then): use a fresh NAME per replay.

    Raises:
        ReplayError: no definition for a run's workflow.
        CalmrunError: the replayed runs did not all finish within ``wait_s``.
    """
    from calmrun.streams.worker import Worker

    shadow_cfg = shadow_settings(settings, shadow)
    chosen = {s.run_id: pick_definition(definitions, s.workflow, s.version, version) for s in snapshots}
    workflows = list({(d.name, d.version): d for d in chosen.values()}.values())
    if len({d.name for d in workflows}) != len(workflows):
        raise ReplayError("one live replay runs one definition per workflow: give --workflow-version")
    requests = [request_of(s) for s in snapshots]
    worker = Worker(shadow_cfg, workflows, agents, models)
    await worker.start()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        everything = set(range(shadow_cfg.kafka.partitions))
        while worker.parts.owned != everything:  # submit once it owns (and restored) every partition
            if loop.time() > end:
                raise ReplayError("the shadow worker did not get its partitions within 60s")
            await asyncio.sleep(0.05)
        async with Client(shadow_cfg) as client:
            await client.submit_many(requests)
            states = await _wait(client, [r.run_id or "" for r in requests], wait_s, on_progress)
    finally:
        await worker.stop()
    wanted = set(states)
    replays = await scan_runs(shadow_cfg, keep=lambda rid: rid in wanted)
    return [
        compare(s, states[s.run_id], replays[s.run_id].events if s.run_id in replays else [], shadow)
        for s in snapshots
    ]


async def _wait(
    client: Client, run_ids: list[str], wait_s: float, on_progress: Callable[[int, int], None] | None
) -> dict[str, RunState]:
    if on_progress is None:
        return await client.wait_terminal(run_ids, wait_s=wait_s)
    # poll the states so progress can be shown; the final read is the same as wait_terminal's
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        states = await client.read_states()
        done = sum(1 for r in run_ids if r in states and states[r].is_terminal())
        on_progress(done, len(run_ids))
        if done == len(run_ids):
            return {r: states[r] for r in run_ids}
        if loop.time() > end:
            return await client.wait_terminal(run_ids, wait_s=0.1)  # raises with counts by status
        await asyncio.sleep(0.5)


def compare(
    original: Snapshot, replay_state: RunState, replay_events: list[RunEvent], shadow: str
) -> LiveReplay:
    """Put a run and its replay side by side (pure)."""
    a = sides(original.events, original.state)
    b = sides(replay_events, replay_state)
    order = list(dict.fromkeys([*a, *b]))
    out = LiveReplay(
        run_id=original.run_id,
        shadow=shadow,
        original_status=original.state.status if original.state else "-",
        replay_status=replay_state.status,
        original_outcome=original.state.outcome if original.state else None,
        replay_outcome=replay_state.outcome,
        original_path=path_of(original.events),
        replay_path=path_of(replay_events),
    )
    for name in order:
        out.steps.append(StepComparison(name, a.get(name), b.get(name)))
        if name in a:
            out.original_total.add(a[name])
        if name in b:
            out.replay_total.add(b[name])
    return out


def sides(events: Sequence[RunEvent], state: RunState | None) -> dict[str, Side]:
    """Per step, in order of first scheduling: status, attempts, last output or error, summed cost."""
    out: dict[str, Side] = {}
    for e in events:
        if e.step is None:
            continue
        if e.type == "step.scheduled":
            side = out.setdefault(e.step, Side())
            side.attempts = max(side.attempts, e.attempt or 0)
            side.model = e.data.get("model") or side.model
        if e.type not in ("step.succeeded", "step.failed") or e.data.get("kind", "run") != "run":
            continue
        side = out.setdefault(e.step, Side())
        if e.type == "step.succeeded":
            side.output, side.error = e.data.get("output"), None
        else:
            side.error = f"{e.data.get('error_type')}: {e.data.get('error')}"
        if e.cost is not None:
            side.latency_ms += e.cost.latency_ms
            side.tokens_in += e.cost.tokens_in
            side.tokens_out += e.cost.tokens_out
            side.cost_usd += e.cost.cost_usd
            side.model = e.cost.model or side.model
    if state is not None:
        for name, st in state.steps.items():
            out.setdefault(name, Side()).status = st.status
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v

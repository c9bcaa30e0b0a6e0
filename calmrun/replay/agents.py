"""Agent replay: every journaled agent of a run runs again from its journal, offline, with no model.

``calmrun replay run RUN --agents recorded`` gives, beside the workflow-level verdict, one verdict per agent
attempt found in ``<prefix>.agents.journal``: the attempt's task (written in its journal's claim) runs again
through the same agent code, every model request and tool call is answered from the journal, and

- ``converged``: the agent made the recorded calls in order, all of them, and returned the recorded output;
- ``diverged``: it made another call at a position (``NonDeterministicAgentError``: both calls are named),
  made a call past the recorded end, stopped before it, or returned another output.

No model is ever asked: every model alias is replaced by one that fails when called, and the journal runs
offline (``live=False``), so a unit past the recorded end fails instead of running. Tools whose call is
recorded do not run either. Attempts still running, or that ended without an output, are compared on their
calls only: the replay stops, converged, at the first call past their recorded end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models.function import AgentInfo, FunctionModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.agents.journal import AttemptJournal, Claim, Entry, MemoryJournal, Part, chain, tasks
from calmrun.errors import NonDeterministicAgentError
from calmrun.replay.snapshot import Snapshot
from calmrun.settings import ModelAlias, Settings
from calmrun.workflow.events import RunEvent, StepTask

AgentVerdict = Literal["converged", "diverged"]


@dataclass(frozen=True)
class AgentReplay:
    """The verdict of one agent attempt replayed from its journal.

    Attributes:
        attempt_key: the attempt (its idempotency key).
        agent: the agent reference.
        units: journal entries recorded; ``answered``: how many the replay consumed.
        model_requests: requests the replay sent to a model (always 0: a model call fails the replay).
        position: where it diverged, if it did at a position.
        reason: why it diverged, in one line.
    """

    attempt_key: str
    step: str
    attempt: int
    agent: str
    verdict: AgentVerdict
    units: int
    answered: int
    model_requests: int = 0
    position: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NoModel:
    """Every alias resolves to a model that counts and refuses calls: a replay never reaches a provider.

    The aliases keep their configuration (output mode, settings), so the agent is built as it was live.
    """

    def __init__(self) -> None:
        self.requests = 0

    def registry(self, configured: Mapping[str, ModelAlias], aliases: Iterable[str]) -> ModelRegistry:
        async def refuse(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            self.requests += 1
            raise LookupError("an agent replay asked a model: the journal has no answer for this request")

        model = FunctionModel(refuse)
        return ModelRegistry(configured, overrides={a: model for a in {*configured, *aliases}})


async def replay_agents(
    records: Sequence[Entry | Claim | Part],
    events: Sequence[RunEvent],
    agents: AgentRegistry,
    aliases: Mapping[str, ModelAlias] | None = None,
) -> list[AgentReplay]:
    """Replay every attempt journaled in ``records`` (one run's), comparing outputs with ``events``.

    Args:
        records: the run's journal records in log order (``KafkaJournal.records``).
        events: the run's events (``Snapshot.events``): the recorded output of each attempt.
        agents: resolves the agent references of the tasks (the code under test).
        aliases: the model aliases' configuration (``settings.models``): the output mode and settings the
            agent ran with; the models themselves are never built.
    """
    outputs = {
        (e.step, e.attempt, str(e.data.get("kind", "run"))): e.data.get("output")
        for e in events
        if e.type == "step.succeeded"
    }
    out: list[AgentReplay] = []
    for key, raw in tasks(records).items():
        task = StepTask.model_validate(raw)
        recorded = chain(records, key)
        output = outputs.get((task.step, task.attempt, task.kind))
        out.append(await _replay_one(task, recorded, output, agents, aliases or {}))
    return out


async def _replay_one(
    task: StepTask,
    recorded: list[Entry],
    output: Any,
    agents: AgentRegistry,
    aliases: Mapping[str, ModelAlias],
) -> AgentReplay:
    no_model = _NoModel()
    models = no_model.registry(aliases, [task.model] if task.model else [])
    ctx = StepContext.for_task(task, models)
    journal = AttemptJournal(
        MemoryJournal(),
        run_id=task.run_id,
        step=task.step,
        attempt=task.attempt,
        attempt_key=task.idempotency_key,
        live=False,
        recorded=list(recorded),
    )
    ctx.journal = journal
    reason: str | None = None
    position: int | None = None
    try:
        produced = await agents.resolve(task.agent).call(ctx, task.input)
    except NonDeterministicAgentError as exc:
        reason, position = str(exc), exc.position
    except LookupError as exc:
        if output is None and journal.position - 1 == len(recorded):
            pass  # the recorded attempt ended here without an output (failed, timed out, killed): same calls
        else:
            reason, position = str(exc), journal.position - 1
    # the agent code failed where the recorded attempt did not: that is a verdict, not a crash of the replay
    except Exception as exc:
        reason = f"the agent raised {type(exc).__name__}: {exc}"[:500]
    else:
        if journal.position < len(recorded):
            reason = f"the agent stopped after {journal.position} of {len(recorded)} recorded calls"
            position = journal.position
        elif output is not None and produced != output:
            reason = "the agent returned another output than the recorded one"
    verdict: AgentVerdict = "converged" if reason is None else "diverged"
    return AgentReplay(
        attempt_key=task.idempotency_key,
        step=task.step,
        attempt=task.attempt,
        agent=task.agent,
        units=len(recorded),
        verdict=verdict,
        answered=journal.replayed,
        model_requests=no_model.requests,
        position=position,
        reason=reason,
    )


async def replay_run_agents(settings: Settings, snap: Snapshot) -> list[AgentReplay]:
    """:func:`replay_agents` of ``snap``'s run, its journal read from ``<prefix>.agents.journal``."""
    from calmrun.streams.journal import KafkaJournal, run_since

    journal = KafkaJournal(settings)
    try:
        records = await journal.records(snap.run_id, run_since(snap.state.created_ms if snap.state else None))
    finally:
        await journal.close()
    return await replay_agents(records, snap.events, AgentRegistry(), settings.models)

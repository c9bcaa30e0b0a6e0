"""Agents and the pydantic-ai model layer: typed agents, model aliases, one step attempt at a time."""

from calmrun.agents.context import StepContext
from calmrun.agents.executor import AGENT_TIMEOUT, execute
from calmrun.agents.models import ModelRegistry
from calmrun.agents.specs import AgentFn, AgentRegistry, AgentSpec

__all__ = [
    "AGENT_TIMEOUT",
    "AgentFn",
    "AgentRegistry",
    "AgentSpec",
    "ModelRegistry",
    "StepContext",
    "execute",
]

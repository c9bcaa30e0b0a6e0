"""calmrun: a Kafka-native runtime for AI-agent workflows: deterministic, replayable, cost-observable.

The public API is what ``__all__`` lists; import it from here (``from calmrun import Worker, StepContext``),
never from the modules below, which may move. The errors are imported at once (they are small); everything
else is imported on first use, so ``import calmrun`` stays cheap (the worker pulls in aiokafka and
pydantic-ai, several seconds on a busy machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from calmrun.errors import (
    BrokerUnavailableError,
    CalmrunError,
    ConfigError,
    CostsNotCurrentError,
    DecodeError,
    ErrorKind,
    InputMappingError,
    InvalidInputError,
    InvalidOutputError,
    KafkaAuthError,
    KafkaAuthorizationError,
    LimitExceededError,
    PoisonStormError,
    ProviderError,
    ReplayError,
    SerializationError,
    TopicMissingError,
    UnknownAgentError,
    UnknownModelError,
    UnknownSchemaError,
    UnknownWorkflowError,
    WorkerError,
)

if TYPE_CHECKING:
    from calmrun.agents.context import StepContext
    from calmrun.agents.models import ModelRegistry
    from calmrun.agents.specs import AgentRegistry
    from calmrun.client import Client
    from calmrun.settings import Settings, load_settings
    from calmrun.streams.pool import PoolExecutor
    from calmrun.streams.worker import Worker
    from calmrun.workflow.definition import WorkflowDef, load_workflow, parse_workflow
    from calmrun.workflow.events import RunCommand, RunEvent, RunRequest
    from calmrun.workflow.state import RunState

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # running workflows
    "Worker": "calmrun.streams.worker",
    "PoolExecutor": "calmrun.streams.pool",
    "Client": "calmrun.client",
    # definitions
    "WorkflowDef": "calmrun.workflow.definition",
    "load_workflow": "calmrun.workflow.definition",
    "parse_workflow": "calmrun.workflow.definition",
    # agents and models
    "StepContext": "calmrun.agents.context",
    "AgentRegistry": "calmrun.agents.specs",
    "ModelRegistry": "calmrun.agents.models",
    # what a client writes and reads
    "RunRequest": "calmrun.workflow.events",
    "RunCommand": "calmrun.workflow.events",
    "RunEvent": "calmrun.workflow.events",
    "RunState": "calmrun.workflow.state",
    # configuration
    "Settings": "calmrun.settings",
    "load_settings": "calmrun.settings",
}

__all__ = [
    "AgentRegistry",
    "BrokerUnavailableError",
    "CalmrunError",
    "Client",
    "ConfigError",
    "CostsNotCurrentError",
    "DecodeError",
    "ErrorKind",
    "InputMappingError",
    "InvalidInputError",
    "InvalidOutputError",
    "KafkaAuthError",
    "KafkaAuthorizationError",
    "LimitExceededError",
    "ModelRegistry",
    "PoisonStormError",
    "PoolExecutor",
    "ProviderError",
    "ReplayError",
    "RunCommand",
    "RunEvent",
    "RunRequest",
    "RunState",
    "SerializationError",
    "Settings",
    "StepContext",
    "TopicMissingError",
    "UnknownAgentError",
    "UnknownModelError",
    "UnknownSchemaError",
    "UnknownWorkflowError",
    "Worker",
    "WorkerError",
    "WorkflowDef",
    "__version__",
    "load_settings",
    "load_workflow",
    "parse_workflow",
]


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name is an error there, never ``Any``

    def __getattr__(name: str) -> Any:
        """Import a public name on first use and keep it here, so the next lookup is a plain attribute."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'calmrun' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

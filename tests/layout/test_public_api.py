"""The public API: every name of ``calmrun.__all__`` resolves, and ``import calmrun`` stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys

import calmrun

# What a user of calmrun needs, importable from the package itself (docs/api.md lists them).
REQUIRED = {
    "Worker",
    "PoolExecutor",
    "Client",
    "WorkflowDef",
    "load_workflow",
    "parse_workflow",
    "StepContext",
    "AgentRegistry",
    "ModelRegistry",
    "RunRequest",
    "RunCommand",
    "RunEvent",
    "RunState",
    "Settings",
    "load_settings",
    "CalmrunError",
    "ErrorKind",
}


def test_every_public_name_resolves() -> None:
    assert set(calmrun.__all__) >= REQUIRED
    for name in calmrun.__all__:
        assert getattr(calmrun, name) is not None, name
    assert set(calmrun.__all__) <= set(dir(calmrun))


def test_public_names_are_the_objects_of_their_modules() -> None:
    from calmrun.agents.context import StepContext
    from calmrun.streams.worker import Worker

    assert calmrun.Worker is Worker
    assert calmrun.StepContext is StepContext
    assert issubclass(calmrun.UnknownAgentError, calmrun.CalmrunError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        calmrun.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("calmrun.NoSuchThing resolved")


def test_import_calmrun_loads_neither_kafka_nor_the_model_layer() -> None:
    """A program that needs only an error class must not pay for aiokafka and pydantic-ai on import."""
    code = "import sys, json, calmrun; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert not {"aiokafka", "pydantic_ai", "fastavro", "calmrun.streams.worker"} & loaded

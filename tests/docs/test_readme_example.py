"""The README's workflow and agent code are the files it quotes, and they run: on a real broker, by the Python
API example of docs/api.md (which imports only from ``calmrun``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from calmrun import AgentRegistry, load_workflow
from calmrun.agents.specs import AgentSpec

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
API_PAGE = ROOT / "docs" / "api.md"


def quoted(text: str, marker: str) -> str:
    """The fenced block right after ``<!-- example: MARKER -->``."""
    match = re.search(rf"<!-- example: {re.escape(marker)} -->\n```\w+\n(.*?)^```", text, re.S | re.M)
    assert match, f"no block quoted under <!-- example: {marker} -->"
    return match.group(1)


@pytest.mark.parametrize("path", ["examples/hello/workflow.yaml", "examples/hello/agents.py"])
def test_the_readme_quotes_the_example_files_verbatim(path: str) -> None:
    assert quoted(README.read_text(), path) == (ROOT / path).read_text()


def test_the_readme_workflow_loads_and_its_agents_resolve() -> None:
    wf = load_workflow(ROOT / "examples/hello/workflow.yaml")
    assert [s.name for s in wf.steps] == ["greet", "review"]
    registry = AgentRegistry()
    specs = [registry.resolve(s.agent) for s in wf.steps if s.agent]
    assert all(isinstance(spec, AgentSpec) for spec in specs)
    # the agent code imports only the public API
    agents = (ROOT / "examples/hello/agents.py").read_text()
    assert re.findall(r"^from calmrun\S* import", agents, re.M) == ["from calmrun import"]


async def test_the_api_page_example_runs_the_readme_workflow(
    broker: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = quoted(API_PAGE.read_text(), "api")
    assert re.findall(r"^from calmrun\S* import", source, re.M) == ["from calmrun import"]
    monkeypatch.chdir(ROOT)  # the example's paths, and its agent references, are relative to the project
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict[str, Any] = {"__name__": "docs_api_example"}
    exec(compile(source, str(API_PAGE), "exec"), namespace)
    run_id = await namespace["main"](broker, prefix)

    from calmrun import Client, load_settings

    settings = load_settings(kafka={"bootstrap": broker, "prefix": prefix})
    async with Client(settings) as client:
        state = await client.state(run_id)
    assert state is not None
    assert state.status == "completed"
    assert state.outcome in {"sent", "held"}
    assert set(state.steps) == {"greet", "review"}
    assert state.steps["greet"].output == {"text": "Hello, Ada!"}

"""The house rules that a reader relies on: no import circles, small modules, a pure decider."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "calmrun"
MAX_LINES = 600
"""Where a module is a blob, not one job: the cap catches that, it does not shape the code."""


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """calmrun modules imported anywhere in the module, inside functions too (``if TYPE_CHECKING:`` excluded).

    An import inside a function is still a dependency: it runs when the function does, and a circle of
    them is a circle a reader has to hold in their head.
    """
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join([*anchor, mod] if mod else anchor)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_module_import_circle() -> None:
    g = graph()
    # a package's __init__ re-exporting its modules is not a circle of the modules themselves
    found = [c for c in cycles(g) if not all(m == package_of(m) or m.count(".") == 1 for m in c)]
    assert not found, f"import circles: {found}"


def test_no_package_import_circle() -> None:
    pg: dict[str, set[str]] = defaultdict(set)
    for m, deps in graph().items():
        for d in deps:
            if package_of(d) != package_of(m):
                pg[package_of(m)].add(package_of(d))
    assert not cycles(pg), f"package circles: {cycles(pg)}"


def test_no_module_over_600_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    over = {n: k for n, k in long.items() if k > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_the_decider_imports_no_kafka_faust_or_clock() -> None:
    """Every module of ``calmrun.workflow`` (the decider, the transitions, each step kind) is pure."""
    pure = sorted(n for n in modules() if n.startswith("calmrun.workflow"))
    assert {"calmrun.workflow.decider", "calmrun.workflow.kinds.map", "calmrun.workflow.kinds.child"} <= set(
        pure
    )
    for name in pure:
        tree = ast.parse(modules()[name].read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"aiokafka", "faust", "time", "datetime", "random", "asyncio"}, (name, names)


def test_the_command_line_loads_no_agent_machinery_for_help() -> None:
    """``calmrun --help`` and the read-only verbs answer at once: pydantic-ai and openai are a worker's."""
    import subprocess
    import sys

    code = "import sys, calmrun.cli; print(sorted(m for m in ('pydantic_ai', 'openai') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("module", ["calmrun.streams.worker", "calmrun.streams.pool"])
def test_the_worker_is_its_composition_wired_by_constructors(module: str) -> None:
    """``Worker.__init__`` (and ``PoolExecutor``'s) builds the rooms and hands each its ports: no lambda joins
    two rooms, no room is wired after it is built (``self.room.hook = ...``), and no room takes more than
    ten arguments (what every room reads travels as one ``streams.shared.Shared``)."""
    tree = ast.parse(modules()[module].read_text())
    assert not [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
    [init] = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    wired = [
        ast.unparse(t)
        for n in ast.walk(init)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute)
    ]
    assert not wired, f"rooms wired after construction: {wired}"
    crowded = [
        ast.unparse(n)
        for n in ast.walk(init)
        if isinstance(n, ast.Call) and len(n.args) + len(n.keywords) > 10
    ]
    assert not crowded, f"rooms given more than ten arguments: {crowded}"


WORKER_LINES = 160
"""About 150: ``worker.py`` is the pipeline's composition; helpers, read-outs, plumbing are the rooms'."""


def test_the_worker_is_only_its_composition() -> None:
    """``streams.worker`` builds the rooms (``__init__``), runs their loops and closes them (``_open``,
    ``_close``), and shows its counters (``stats``, read from ``streams.stats.Readout``): nothing else."""
    path = modules()["calmrun.streams.worker"]
    lines = len(path.read_text().splitlines())
    assert lines <= WORKER_LINES, f"worker.py is {lines} lines: move what is not composition to its room"
    tree = ast.parse(path.read_text())
    [worker] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Worker"]
    defined = {n.name for n in worker.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert defined == {"__init__", "stats", "_open", "_close"}, defined

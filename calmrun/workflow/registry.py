"""The definitions a worker serves: several versions of each workflow, and which one a run is pinned to.

A definition's identity is (name, version, digest): ``version`` is the one written in the YAML,
``digest`` the content hash of the validated definition (``WorkflowDef.digest``). A run is pinned to the
identity it started with (``run.requested`` and its state record both); new runs take the newest version
served. Newest is the highest version: compared as numbers when both are integers ("10" after "9"),
otherwise as text, and an integer version comes before a text one.

Pure: no Kafka, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from calmrun.errors import ConfigError
from calmrun.workflow.definition import WorkflowDef


def version_order(version: str) -> tuple[int, int, str]:
    """Sort key of a version: integers numerically, then text lexically."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(frozen=True, order=True)
class Pin:
    """What a run needs: a workflow at a version and digest (an empty digest: a state from before 0.3,
    any definition of that version will do)."""

    workflow: str
    version: str
    digest: str = ""

    def __str__(self) -> str:
        return f"{self.workflow} v{self.version}" + (f" ({self.digest})" if self.digest else "")

    @property
    def key(self) -> str:
        """As the group's member metadata carries it: ``workflow@version#digest``."""
        return f"{self.workflow}@{self.version}#{self.digest}"

    @classmethod
    def parse(cls, key: str) -> Pin:
        name, _, rest = key.partition("@")
        version, _, digest = rest.partition("#")
        return cls(name, version, digest)

    def served_by(self, other: Pin) -> bool:
        """Does a worker serving ``other`` (always with a digest) serve what this pin needs?"""
        return (
            self.workflow == other.workflow
            and self.version == other.version
            and (not self.digest or self.digest == other.digest)
        )


def pin_of(wf: WorkflowDef) -> Pin:
    return Pin(wf.name, wf.version, wf.digest)


class Definitions:
    """The definitions one worker serves, by name and version.

    Iterating gives the workflow names; ``values()`` every definition (all versions).

    Raises:
        ConfigError: two definitions with the same name and version but different content.
    """

    def __init__(self, workflows: Iterable[WorkflowDef]) -> None:
        self._by: dict[tuple[str, str], WorkflowDef] = {}
        for wf in workflows:
            seen = self._by.get((wf.name, wf.version))
            if seen is not None and seen.digest != wf.digest:
                raise ConfigError(
                    f"workflow {wf.name!r} version {wf.version!r} is given twice with different content "
                    f"(digests {seen.digest} and {wf.digest}): give the changed one a new version"
                )
            self._by[(wf.name, wf.version)] = wf
        self._newest: dict[str, WorkflowDef] = {}
        for wf in sorted(self._by.values(), key=lambda w: version_order(w.version)):
            self._newest[wf.name] = wf

    def newest(self, name: str) -> WorkflowDef | None:
        """The definition new runs of ``name`` take: its highest version served here."""
        return self._newest.get(name)

    def version(self, name: str, version: str) -> WorkflowDef | None:
        return self._by.get((name, version))

    def pinned(self, name: str, version: str, digest: str = "") -> WorkflowDef | None:
        """The definition a run pinned to (name, version, digest) is decided with, if served here."""
        wf = self._by.get((name, version))
        return wf if wf is not None and (not digest or wf.digest == digest) else None

    def serves(self, pin: Pin) -> bool:
        return self.pinned(pin.workflow, pin.version, pin.digest) is not None

    def pins(self) -> list[Pin]:
        return sorted(pin_of(wf) for wf in self._by.values())

    def values(self) -> list[WorkflowDef]:
        """Every definition served, each version once."""
        return list(self._by.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._newest)

    def __contains__(self, name: object) -> bool:
        return name in self._newest

    def __len__(self) -> int:
        return len(self._newest)


def check_children(workflows: Iterable[WorkflowDef]) -> None:
    """Refuse child workflows (``kind: workflow``) that are not served here, or that start each other in
    a circle (a run would start itself, without end).

    Raises:
        ConfigError: names the workflow, the step and its ``workflow`` field.
    """
    from calmrun.workflow.kinds.child import WorkflowStep

    wfs = list(workflows)
    served = {wf.name for wf in wfs}
    calls: dict[str, set[str]] = {}
    for wf in wfs:
        for s in wf.steps:
            if isinstance(s, WorkflowStep):
                if s.workflow not in served:
                    raise ConfigError(
                        f"workflow {wf.name!r} step {s.name!r} workflow: {s.workflow!r} is not served "
                        f"here (served: {sorted(served)})"
                    )
                calls.setdefault(wf.name, set()).add(s.workflow)

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise ConfigError(f"child workflows start each other in a circle: {' -> '.join([*path, name])}")
        for child in sorted(calls.get(name, ())):
            visit(child, [*path, name])

    for name in sorted(calls):
        visit(name, [])

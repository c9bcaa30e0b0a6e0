"""The Schema Registry part of ``calmrun topics create``: each calmrun schema against its subject."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.markup import escape

from calmrun.cli.common import err, out
from calmrun.errors import RegistryError
from calmrun.kafka.topics import Topics
from calmrun.settings import Settings
from calmrun.wire.codec import wire_codec
from calmrun.wire.confluent import ConfluentFraming, check_subjects
from calmrun.workflow.definition import WorkflowDef


def check_registry(settings: Settings, workflows: Sequence[WorkflowDef]) -> None:
    """Print each subject's rule and verdict; exit 1 when one refuses a calmrun schema or the registry
    cannot be asked (exit 2 would be a usage error: this is the registry's answer)."""
    framing = ConfluentFraming.from_settings(settings.wire)
    assert framing is not None  # the caller checked wire.registry.url
    framed = Topics(settings.kafka.prefix).framed(workflows)
    try:
        checks = check_subjects(framing, framed, wire_codec().schemas())
    except RegistryError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    bad = [c for c in checks if c.problems]
    for c in checks:
        verdict = "incompatible: " + "; ".join(c.problems) if c.problems else "compatible"
        registered = f", schema ID {c.schema_id}" if c.schema_id is not None else ""
        out.print(f"subject {c.subject} ({c.record}, {c.rule}): {verdict}{registered}", markup=False)
    if bad:
        hint = ""
        if settings.wire.registry.subject_strategy == "TopicName" and any(
            c.record == "RunCommand" for c in bad
        ):
            hint = (
                " (the requests topic carries RunRequest and RunCommand: under TopicName both share one "
                "subject, which then needs compatibility NONE; or set wire.registry.subject_strategy: "
                "TopicRecordName)"
            )
        err.print(f"[red]error:[/red] {len(bad)} subject(s) refuse calmrun's schemas{hint}")
        raise typer.Exit(1)

"""The ``calmrun`` command: one package for every verb (settings are built once per command and passed down).

Settings come from ``--config`` file < ``CALMRUN_*`` environment < flags. Human-readable output by
default; ``--json`` for scripts. Each verb's module imports what it needs when it runs, so ``--help``
and the read-only verbs start at once.
"""

from __future__ import annotations

import typer

from calmrun.cli import costs, deploy, ops, replay, runcommands, runs

app = typer.Typer(help="calmrun: a Kafka-native runtime for AI-agent workflows.", no_args_is_help=True)
dlq_app = typer.Typer(help="The quarantine: dead-letter topics.", no_args_is_help=True)
topics_app = typer.Typer(help="calmrun's Kafka topics.", no_args_is_help=True)
check_app = typer.Typer(help="Checks over what calmrun has written.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(topics_app, name="topics")
app.add_typer(check_app, name="check")
app.add_typer(replay.replay_app, name="replay")
app.add_typer(costs.costs_app, name="costs")
app.add_typer(deploy.deploy_app, name="deploy")
app.command("versions")(deploy.versions)
app.command("snapshot")(replay.snapshot)
app.command("costs-aggregator")(costs.aggregator)
for verb in (runs.worker, runs.submit, runs.status, runs.runs, runs.models, ops.ui, ops.acls):
    app.command()(verb)
for person_verb in (runcommands.approve, runcommands.reject, runcommands.signal, runcommands.cancel):
    app.command()(person_verb)
dlq_app.command("tail")(ops.dlq_tail)
dlq_app.command("redrive")(ops.dlq_redrive)
check_app.command("history")(ops.check_history_cmd)
topics_app.command("create")(ops.topics_create)
topics_app.command("check")(ops.topics_check)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

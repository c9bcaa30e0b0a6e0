"""``python -m calmrun.replay``: the replay commands on their own (``calmrun replay`` once registered)."""

from calmrun.cli.replay import replay_app, snapshot

replay_app.command("snapshot")(snapshot)

if __name__ == "__main__":
    replay_app()

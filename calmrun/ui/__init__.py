"""The operator page (``calmrun ui``): runs, a run's timeline, dead letters, costs and workers, live.

It reads Kafka only and keeps a local SQLite index rebuilt from the topics at start (never a second source
of truth); its one action, redrive, goes through ``Client.redrive`` with the user's name on the command.
"""

from calmrun.ui.access import Access, User
from calmrun.ui.index import RunIndex, RunQuery
from calmrun.ui.server import UiServer
from calmrun.ui.tail import TopicTail

__all__ = ["Access", "RunIndex", "RunQuery", "TopicTail", "UiServer", "User"]

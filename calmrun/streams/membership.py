"""A role's membership of its consumer group: the clients it joins with, the join, the leave.

The deciding worker and a pool's executor join the same way: a group consumer subscribed to their input
topics, its rebalances told to an ``Owner`` as partition numbers. The worker also has a restorer (it reads
the state topic on a takeover, ``streams.restore``) and, when ``worker.liveness`` is on, beats started
before the join, so that its topic and connections are made outside the first rebalance
(``streams.liveness``). A client that cannot start (no broker, TLS/SASL, an ACL) stops what was started
and is raised explained (``calmrun.kafka.connect.start_error``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.errors import KafkaConnectionError

from calmrun.kafka.connect import AUTHORIZATION_ERRORS, start_error
from calmrun.kafka.rebalance import heartbeating
from calmrun.settings import Settings
from calmrun.streams import clients
from calmrun.streams.liveness import Liveness


class Owner(Protocol):
    """What a rebalance listener tells: the partitions (of every input topic) taken and given up."""

    async def assigned(self, parts: set[int]) -> None: ...

    async def revoked(self, parts: set[int]) -> None: ...


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer's rebalance callbacks as partition numbers, to an ``Owner``; ``consumer`` keeps
    heartbeating while the owner takes its partitions (``calmrun.kafka.rebalance``), so that a restore
    longer than the session timeout does not cost the member."""

    def __init__(self, owner: Owner, consumer: AIOKafkaConsumer) -> None:
        self.owner, self.consumer = owner, consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.owner.revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        async with heartbeating(self.consumer):
            await self.owner.assigned({tp.partition for tp in assigned})


class Membership:
    """One role's group membership; see the module docstring. The clients are ``None`` until ``join``.

    Args:
        topics: the input topics the group consumer subscribes to.
        group_id: the group (``settings.group_id`` when not given; a pool's group for an executor).
        assignor: the group's assignor (``streams.clients.group_consumer``).
        restores: make the restorer, started before the join.
        liveness: beat (``streams.liveness``), from before the join until the leave.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        assignor: type[AbstractPartitionAssignor] | None = None,
        restores: bool = False,
        liveness: bool = False,
    ) -> None:
        self.settings, self.topics, self.group_id = settings, list(topics), group_id
        self._assignor, self._restores, self._beats = assignor, restores, liveness
        self.consumer: AIOKafkaConsumer | None = None  # the group consumer
        self.restorer: AIOKafkaConsumer | None = None  # reads the state topic (streams.restore)
        self.liveness: Liveness | None = None

    @classmethod
    def deciding(
        cls, settings: Settings, topics: Sequence[str], assignor: type[AbstractPartitionAssignor]
    ) -> Membership:
        """A deciding worker's: in ``settings.group_id`` with its ``assignor``, a restorer, and beats when
        ``worker.liveness`` is on."""
        return cls(
            settings, topics, assignor=assignor, restores=True, liveness=settings.worker.liveness.enabled
        )

    async def join(self, owner: Owner) -> None:
        """Start the clients and join the group, its rebalances told to ``owner``.

        Raises:
            BrokerUnavailableError, KafkaAuthError, KafkaAuthorizationError: as ``start_error`` says.
        """
        s = self.settings
        consumer = self.consumer = clients.group_consumer(s, self._assignor, self.group_id)
        try:
            if self._restores:
                self.restorer = clients.restorer(s)
                await self.restorer.start()
            if self._beats:  # a killed peer leaves the group in about a second
                self.liveness = Liveness.of(s, consumer)
                await self.liveness.start()
            consumer.subscribe(topics=self.topics, listener=Listener(owner, consumer))
            await consumer.start()
        except (KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:  # an ACL, TLS/SASL, or no broker
            await self.leave()
            self.liveness = None  # started before the join: no beats for a member that failed
            raise (await start_error(s.kafka, exc)) from exc

    async def leave(self) -> None:
        """Stop beating, then stop the group consumer (leaving the group) and the restorer, whatever
        state they are in."""
        if self.liveness is not None:
            await self.liveness.stop()
        for client in (self.consumer, self.restorer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

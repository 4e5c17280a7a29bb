"""In-process bus, the embedded default.

It has no storage of its own: the outbox is the log. The relay hands it a batch of rows
and :meth:`MemoryBus.publish` returns only when every subscriber has settled every event
(handled or dead-lettered), so the relay's position never passes an event a consumer has
not seen; after a crash the relay resends from its position and inboxes drop repeats.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from core.bus.base import DeadLetterSink, Subscription
from core.bus.delivery import Delivery, RetryPolicy, deliver_batch
from core.events import Envelope

__all__ = ["MemoryBus"]


class MemoryBus:
    def __init__(self, dead_letters: DeadLetterSink, policy: RetryPolicy | None = None) -> None:
        self._subs: list[Subscription] = []
        self._sink = dead_letters
        self._policy = policy or RetryPolicy()

    def subscribe(self, subscription: Subscription) -> None:
        self._subs.append(subscription)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        jobs = []
        for sub in self._subs:
            items = [
                Delivery(topic=e.topic, key=e.partition_key, envelope=e)
                for e in envelopes
                if e.topic in sub.topics
            ]
            if items:
                jobs.append(deliver_batch(sub, items, self._sink, self._policy))
        if jobs:
            await asyncio.gather(*jobs)

"""In-process bus, the embedded default.

It has no storage of its own: the outbox is the log. The relay hands it batches of rows;
each subscriber has its own queue and its own worker, which takes *everything waiting* (up
to ``max_batch`` events, across relay batches) and settles it as one delivery
(:func:`~core.bus.delivery.deliver_batch`: a consumer with a ``batch_handler`` applies it
set-based in one transaction). Subscribers therefore run side by side: a slow one (the NPCI
handler waiting for the switch) does not hold the others, and under load its batches grow
instead of its queue.

:meth:`MemoryBus.publish` returns only when every subscriber has settled every event of the
batch (handled or dead-lettered), so the relay's stored position never passes an event a
consumer has not seen; after a crash the relay resends from its position and inboxes drop
repeats. The relay may have several batches in flight (``OutboxRelay(max_in_flight=…)``):
it stores the position of the longest prefix of batches that have settled.

Order: one subscriber's worker settles its queue in order, one delivery at a time, and a
delivery keeps the order of events sharing a partition key; so per-payer order holds. A
subscription may ask for several deliveries at once (``parallel_batches``, the NPCI handler
waiting on the switch): then order holds within each batch only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.bus.base import DeadLetterSink, Subscription
from core.bus.delivery import Delivery, RetryPolicy, dead_letters_from_zero, deliver_batch
from core.events import Envelope

__all__ = ["MemoryBus"]

_log = logging.getLogger(__name__)


@dataclass
class _Ticket:
    """One published batch, as far as one subscriber is concerned."""

    pending: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _Consumer:
    def __init__(
        self,
        sub: Subscription,
        sink: DeadLetterSink,
        policy: RetryPolicy,
        max_batch: int,
        on_settled: Callable[[], None],
    ) -> None:
        self.sub = sub
        self._sink = sink
        self._policy = policy
        self._max_batch = max_batch
        self._on_settled = on_settled
        self._queue: deque[tuple[Delivery, _Ticket]] = deque()
        self._ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.settling = 0  # events handed to a delivery and not settled yet

    @property
    def unsettled(self) -> int:
        return len(self._queue) + self.settling

    def offer(self, items: list[Delivery]) -> _Ticket:
        ticket = _Ticket(pending=len(items))
        if not items:
            ticket.done.set()
            return ticket
        self._queue.extend((item, ticket) for item in items)
        self._ready.set()
        return ticket

    async def run(self) -> None:
        parallel = max(1, self.sub.parallel_batches)
        running: set[asyncio.Task[None]] = set()

        def freed(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._ready.set()

        try:
            while True:
                if not self._queue or len(running) >= parallel:
                    self._ready.clear()  # set again by offer() or a batch settled
                    await self._ready.wait()
                    continue
                size = min(self._max_batch, len(self._queue))
                taken = [self._queue.popleft() for _ in range(size)]
                task = asyncio.create_task(self._settle(taken))
                running.add(task)
                task.add_done_callback(freed)
        finally:
            for task in running:
                task.cancel()

    async def _settle(self, taken: list[tuple[Delivery, _Ticket]]) -> None:
        self.settling += len(taken)
        try:
            await self._deliver(taken)
        finally:
            self.settling -= len(taken)

    async def _deliver(self, taken: list[tuple[Delivery, _Ticket]]) -> None:
        while True:
            try:
                await deliver_batch(self.sub, [d for d, _ in taken], self._sink, self._policy)
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                # deliver_batch settles every item (handled or dead-lettered); reaching here
                # means the dead-letter sink itself failed: try again, nothing is
                # acknowledged that was not settled.
                _log.exception("consumer %s: delivery failed, retrying", self.sub.consumer)
                await asyncio.sleep(self._policy.base_delay)
        for _, ticket in taken:
            ticket.pending -= 1
            if ticket.pending == 0:
                ticket.done.set()
        self._on_settled()


class MemoryBus:
    def __init__(
        self,
        dead_letters: DeadLetterSink,
        policy: RetryPolicy | None = None,
        *,
        max_batch: int = 1_000,
    ) -> None:
        self._sink = dead_letters
        self._policy = policy or RetryPolicy()
        self._max_batch = max_batch
        self._consumers: list[_Consumer] = []
        #: Called after a subscriber settled a delivery: its handlers may have committed
        #: new outbox rows, so the relay (in this process) can look at once.
        self.on_settled: Callable[[], None] = lambda: None

    def subscribe(self, subscription: Subscription) -> None:
        dead_letters_from_zero(subscription.consumer)
        self._consumers.append(
            _Consumer(
                subscription,
                self._sink,
                self._policy,
                self._max_batch,
                lambda: self.on_settled(),
            )
        )

    async def start(self) -> None:
        for consumer in self._consumers:
            if consumer.task is None:
                consumer.task = asyncio.create_task(
                    consumer.run(), name=f"consumer-{consumer.sub.consumer}"
                )

    async def stop(self) -> None:
        tasks = [c.task for c in self._consumers if c.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for consumer in self._consumers:
            consumer.task = None

    async def lag(self) -> dict[str, int]:
        """Per consumer, the events handed to it and not settled yet (add the outbox
        backlog for all it is behind: the outbox is this bus's log)."""
        return {c.sub.consumer: c.unsettled for c in self._consumers}

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if any(c.task is None for c in self._consumers):
            await self.start()  # used without start() (tests, tools): start on demand
        tickets = []
        for consumer in self._consumers:
            topics = consumer.sub.topics
            items = [
                Delivery(topic=e.topic, key=e.partition_key, envelope=e)
                for e in envelopes
                if e.topic in topics
            ]
            tickets.append(consumer.offer(items))
        for ticket in tickets:
            await ticket.done.wait()

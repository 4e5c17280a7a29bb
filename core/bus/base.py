"""The bus port."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.events import Envelope

__all__ = ["BatchHandler", "DeadLetter", "DeadLetterSink", "EventBus", "Handler", "Subscription"]

Handler = Callable[[Envelope], Awaitable[object]]
BatchHandler = Callable[[Sequence[Envelope]], Awaitable[object]]


@dataclass(frozen=True)
class Subscription:
    """A consumer group: ``handler`` sees every event of ``topics`` (of ``event_types``, if set).

    Handlers must be idempotent (inbox row in the effect's transaction): delivery is at
    least once. Events sharing a partition key are handled in order; different keys may
    be handled concurrently, up to ``concurrency``.

    With a ``batch_handler`` the whole batch goes to it at once, in order (the ledger
    appends that way); if the batch fails for good, its events go one by one through
    ``handler`` so that one bad event is dead-lettered alone.

    ``parallel_batches`` > 1 lets the in-process bus settle that many batches of this
    consumer at once, for a consumer that spends its time waiting on the outside world
    (the NPCI handler waits for the switch): order holds within a batch, not between
    batches, so the handler must be safe for that (row locks and status checks).
    """

    consumer: str
    topics: tuple[str, ...]
    handler: Handler
    event_types: frozenset[str] | None = None
    concurrency: int = 64
    batch_handler: BatchHandler | None = None
    parallel_batches: int = 1

    def wants(self, envelope: Envelope) -> bool:
        return self.event_types is None or envelope.event_type in self.event_types


@dataclass(frozen=True)
class DeadLetter:
    consumer: str
    topic: str
    raw: bytes
    reason: str
    attempts: int
    event_id: uuid.UUID | None = None
    event_type: str | None = None


class DeadLetterSink(Protocol):
    async def dead_letter(self, letter: DeadLetter) -> None: ...


class EventBus(Protocol):
    def subscribe(self, subscription: Subscription) -> None:
        """Register a consumer group (before :meth:`start`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Returns once the batch is durably accepted (memory: handled by every subscriber)."""

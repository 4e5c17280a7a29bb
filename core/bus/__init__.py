"""Event bus: one interface (:class:`EventBus`), two backends.

- :mod:`core.bus.memory` — in-process, the embedded default. Durable through the outbox:
  the relay only advances past a batch once every subscriber has handled it.
- :mod:`core.bus.kafka` — Kafka protocol via aiokafka: consumer groups, offsets committed
  after the effect is stored, a dead-letter topic.

Both deliver through :func:`core.bus.delivery.deliver_batch`, so retries, backoff,
dead-lettering and per-key ordering behave the same on either.
"""

from core.bus.base import DeadLetter, DeadLetterSink, EventBus, Subscription
from core.bus.delivery import deliver_batch

__all__ = ["DeadLetter", "DeadLetterSink", "EventBus", "Subscription", "deliver_batch"]

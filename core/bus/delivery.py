"""Delivery shared by both backends: decode, filter, retry with backoff, dead-letter.

A message is *settled* when its handler succeeded or it went to dead letters; only then
may the backend advance (memory: the relay position; Kafka: the committed offset). A
:class:`~core.errors.PoisonMessage` skips the retries; any other error is retried with
exponential backoff and jitter, ``max_attempts`` times in all, then dead-lettered with
its reason, and the consumer keeps going. An error that means the database is unavailable
(down, restarting, failing over) is no fault of the message: it is retried, with the same
backoff, until the database is back, and never counted as an attempt, so an outage
dead-letters nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from core.bus.base import DeadLetter, DeadLetterSink, Subscription
from core.errors import PoisonMessage
from core.events import Envelope
from core.metrics import CONSUMER_BATCH, CONSUMER_EVENTS, DEAD_LETTERS
from core.storage import database_unavailable

__all__ = ["Delivery", "RetryPolicy", "dead_letters_from_zero", "deliver_batch"]

_log = logging.getLogger(__name__)


def dead_letters_from_zero(consumer: str) -> None:
    """Export the consumer's dead-letter count at 0 from its start. A series that first
    appears at 1 shows no increase to Prometheus (``increase()`` needs an earlier sample),
    so the first dead letter of a consumer would not fire ``UpiDeadLetters``."""
    DEAD_LETTERS.labels(consumer)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        capped: float = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return random.uniform(capped / 2, capped)


@dataclass(frozen=True)
class Delivery:
    """One message as a backend received it: raw bytes, decoded lazily."""

    topic: str
    key: str
    raw: bytes = b""
    envelope: Envelope | None = None


async def _settle(
    sub: Subscription, item: Delivery, sink: DeadLetterSink, policy: RetryPolicy
) -> None:
    envelope = item.envelope
    attempt = 0
    waits = 0
    while True:
        attempt += 1
        try:
            if envelope is None:
                envelope = Envelope.from_bytes(item.raw)
            if not sub.wants(envelope):
                return
            await sub.handler(envelope)
            CONSUMER_EVENTS.labels(sub.consumer, "ok").inc()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if database_unavailable(exc):
                attempt -= 1
                waits += 1
                await _wait_for_database(sub, exc, waits, policy)
                continue
            poison = isinstance(exc, PoisonMessage)
            if poison or attempt >= policy.max_attempts:
                reason = f"{type(exc).__name__}: {exc}"
                await sink.dead_letter(
                    DeadLetter(
                        consumer=sub.consumer,
                        topic=item.topic,
                        raw=item.raw or (envelope.to_bytes() if envelope else b""),
                        reason=reason[:2000],
                        attempts=attempt,
                        event_id=envelope.event_id if envelope else None,
                        event_type=envelope.event_type if envelope else None,
                    )
                )
                CONSUMER_EVENTS.labels(sub.consumer, "dead_lettered").inc()
                DEAD_LETTERS.labels(sub.consumer).inc()
                _log.error(
                    "dead-lettered",
                    extra={
                        "consumer": sub.consumer,
                        "reason": reason,
                        "transaction_id": envelope.transaction_id if envelope else None,
                    },
                )
                return
            CONSUMER_EVENTS.labels(sub.consumer, "retried").inc()
            _log.warning(
                "handler failed, retrying",
                extra={"consumer": sub.consumer, "attempt": attempt, "error": repr(exc)},
            )
            await asyncio.sleep(policy.delay(attempt))


async def _settle_as_batch(
    sub: Subscription, items: Sequence[Delivery], sink: DeadLetterSink, policy: RetryPolicy
) -> None:
    assert sub.batch_handler is not None
    ready: list[Delivery] = []
    for item in items:
        envelope = item.envelope
        if envelope is None:
            try:
                envelope = Envelope.from_bytes(item.raw)
            except PoisonMessage:
                await _settle(sub, item, sink, policy)  # dead-letters it with its reason
                continue
        if sub.wants(envelope):
            ready.append(Delivery(item.topic, item.key, item.raw, envelope))
    if not ready:
        return
    attempt = waits = 0
    while attempt < policy.max_attempts:
        attempt += 1
        try:
            await sub.batch_handler([d.envelope for d in ready if d.envelope is not None])
            CONSUMER_EVENTS.labels(sub.consumer, "ok").inc(len(ready))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if database_unavailable(exc):
                attempt -= 1
                waits += 1
                await _wait_for_database(sub, exc, waits, policy)
                continue
            if isinstance(exc, PoisonMessage):
                # One of them cannot be handled at all: no point in retrying the batch.
                _log.warning(
                    "batch holds a poison event, settling one by one",
                    extra={"consumer": sub.consumer, "error": repr(exc)},
                )
                break
            _log.warning(
                "batch handler failed",
                extra={"consumer": sub.consumer, "attempt": attempt, "error": repr(exc)},
            )
            if attempt < policy.max_attempts:
                await asyncio.sleep(policy.delay(attempt))
    for item in ready:  # one by one: only what is really bad goes to dead letters
        await _settle(sub, item, sink, policy)


async def _wait_for_database(
    sub: Subscription, exc: BaseException, waits: int, policy: RetryPolicy
) -> None:
    if waits == 1 or waits % 10 == 0:
        _log.warning(
            "database unavailable, waiting",
            extra={"consumer": sub.consumer, "error": str(exc).splitlines()[0][:200]},
        )
    CONSUMER_EVENTS.labels(sub.consumer, "waited").inc()
    await asyncio.sleep(policy.delay(min(waits, 6)))


async def deliver_batch(
    sub: Subscription,
    items: Sequence[Delivery],
    sink: DeadLetterSink,
    policy: RetryPolicy,
) -> None:
    """Settle every item. Same key → in order; different keys → concurrently (bounded)."""
    CONSUMER_BATCH.labels(sub.consumer).observe(len(items))
    if sub.batch_handler is not None:
        await _settle_as_batch(sub, items, sink, policy)
        return
    lanes: dict[str, list[Delivery]] = defaultdict(list)
    for item in items:
        lanes[item.key].append(item)
    gate = asyncio.Semaphore(sub.concurrency)

    async def run_lane(lane: list[Delivery]) -> None:
        async with gate:
            for item in lane:
                await _settle(sub, item, sink, policy)

    if len(lanes) == 1:
        await run_lane(next(iter(lanes.values())))
        return
    async with asyncio.TaskGroup() as group:
        for lane in lanes.values():
            group.create_task(run_lane(lane))

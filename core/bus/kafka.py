"""Kafka-protocol bus via aiokafka (the distributed mode).

Delivery guarantees:

* **Topics and keys.** An event of topic ``payments`` goes to ``<prefix>.payments``, keyed by
  its partition key (a hash of the payer VPA), so one payer's events stay in order on one
  partition. Topics (and ``<prefix>.dlq``) are created at start with
  ``UPI_KAFKA_PARTITIONS`` partitions.
* **Publishing.** :meth:`KafkaBus.publish` returns once the broker acknowledged every
  record of the batch (``acks=all``). The producer is idempotent when
  ``UPI_KAFKA_IDEMPOTENCE`` is on (the default, right for real Kafka); brokers that refuse
  ``InitProducerId`` (the Tansu test broker) need it off.
* **Consuming.** One consumer group per :class:`~core.bus.base.Subscription`. A batch is
  handed to :func:`~core.bus.delivery.deliver_batch` (retries with backoff, dead letters,
  per-key order) and its offsets are committed only after every record is settled, i.e.
  its effect is stored or it went to dead letters: at-least-once. A consumer killed after
  its effect but before the commit gets the record again; its inbox row makes that a no-op.
* **Dead letters.** Records no retry can fix go to ``<prefix>.dlq`` with the original
  bytes and key, and headers ``reason``, ``consumer``, ``original_topic``, ``attempts``
  (and ``event_id``/``event_type`` when known); they are also kept in PostgreSQL when a
  table sink is given. The consumer then moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    KafkaError,
    TopicAlreadyExistsError,
)

from core.bus.base import DeadLetter, DeadLetterSink, Subscription
from core.bus.delivery import Delivery, RetryPolicy, deliver_batch
from core.config import Settings
from core.errors import BusError
from core.events import Envelope, Topic
from core.metrics import EVENTS_PUBLISHED

__all__ = ["KafkaBus"]

_log = logging.getLogger(__name__)
_START_TIMEOUT_S = 20.0


class KafkaBus:
    def __init__(
        self,
        settings: Settings,
        dead_letters_table: DeadLetterSink | None = None,
        policy: RetryPolicy | None = None,
        *,
        client_id: str = "upi-engine",
    ) -> None:
        self._settings = settings
        self._table = dead_letters_table
        self._policy = policy or RetryPolicy(
            max_attempts=settings.consumer_max_attempts, base_delay=settings.consumer_retry_base_s
        )
        self._client_id = client_id
        self._prefix = settings.kafka_topic_prefix
        self._subs: list[Subscription] = []
        self._producer: AIOKafkaProducer | None = None
        self._consumers: list[AIOKafkaConsumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ names

    def group_name(self, consumer: str) -> str:
        return f"{self._prefix}.{consumer}"

    def topic_name(self, short: str) -> str:
        return f"{self._prefix}.{short}"

    @property
    def dlq_topic(self) -> str:
        return self.topic_name("dlq")

    def _short(self, full: str) -> str:
        return full.removeprefix(self._prefix + ".")

    # ------------------------------------------------------------------ lifecycle

    def subscribe(self, subscription: Subscription) -> None:
        self._subs.append(subscription)

    async def start(self) -> None:
        bootstrap = self._settings.kafka_bootstrap
        await self._create_topics()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=self._settings.kafka_idempotence,
            linger_ms=5,
        )
        try:
            await asyncio.wait_for(producer.start(), _START_TIMEOUT_S)
        except (TimeoutError, KafkaError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            hint = (
                " (the broker may refuse idempotent producers: set UPI_KAFKA_IDEMPOTENCE=false)"
                if self._settings.kafka_idempotence
                else ""
            )
            raise BusError(
                f"cannot start the Kafka producer at {bootstrap}: {exc!r}{hint}"
            ) from exc
        self._producer = producer
        for sub in self._subs:
            consumer = AIOKafkaConsumer(
                *(self.topic_name(t) for t in sub.topics),
                bootstrap_servers=bootstrap,
                client_id=f"{self._client_id}-{sub.consumer}",
                # Namespaced like the topics: deployments (and test runs) sharing a broker
                # never share a consumer group.
                group_id=self.group_name(sub.consumer),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=500,
            )
            try:
                await asyncio.wait_for(consumer.start(), _START_TIMEOUT_S)
            except (TimeoutError, KafkaError) as exc:
                raise BusError(f"cannot start consumer {sub.consumer}: {exc!r}") from exc
            self._consumers.append(consumer)
            self._tasks.append(
                asyncio.create_task(self._consume(sub, consumer), name=f"consume-{sub.consumer}")
            )

    async def _create_topics(self) -> None:
        names = [self.topic_name(t.value) for t in Topic] + [self.dlq_topic]
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._settings.kafka_bootstrap, client_id=self._client_id
        )
        try:
            await asyncio.wait_for(admin.start(), _START_TIMEOUT_S)
        except (TimeoutError, KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await admin.close()
            raise BusError(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap}: {exc!r}"
            ) from exc
        try:
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                topics = [
                    NewTopic(
                        n, num_partitions=self._settings.kafka_partitions, replication_factor=1
                    )
                    for n in missing
                ]
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(topics)
        finally:
            await admin.close()

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        self._tasks.clear()
        self._consumers.clear()
        self._producer = None

    # ------------------------------------------------------------------ publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        producer = self._producer
        if producer is None:
            raise BusError("Kafka bus is not started")
        try:
            futures = []
            for envelope in envelopes:
                futures.append(
                    await producer.send(
                        self.topic_name(envelope.topic),
                        value=envelope.to_bytes(),
                        key=envelope.partition_key.encode(),
                        headers=[
                            ("event_type", envelope.event_type.encode()),
                            ("event_id", str(envelope.event_id).encode()),
                        ],
                    )
                )
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise BusError(f"publish failed: {exc!r}") from exc
        for envelope in envelopes:
            EVENTS_PUBLISHED.labels(envelope.topic).inc()

    async def dead_letter(self, letter: DeadLetter) -> None:
        """The DeadLetterSink of this bus's consumers: the DLQ topic (and the table)."""
        producer = self._producer
        if producer is None:
            raise BusError("Kafka bus is not started")
        headers = [
            ("reason", letter.reason.encode()),
            ("consumer", letter.consumer.encode()),
            ("original_topic", letter.topic.encode()),
            ("attempts", str(letter.attempts).encode()),
        ]
        if letter.event_id is not None:
            headers.append(("event_id", str(letter.event_id).encode()))
        if letter.event_type is not None:
            headers.append(("event_type", letter.event_type.encode()))
        await (await producer.send(self.dlq_topic, value=letter.raw, headers=headers))
        if self._table is not None:
            await self._table.dead_letter(letter)

    # ------------------------------------------------------------------ consuming

    async def _consume(self, sub: Subscription, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            try:
                batch: dict[TopicPartition, list[Any]] = await consumer.getmany(
                    timeout_ms=200, max_records=500
                )
                if not batch:
                    continue
                items = [
                    Delivery(
                        topic=self._short(tp.topic),
                        key=record.key.decode(errors="replace") if record.key else "",
                        raw=record.value or b"",
                    )
                    for tp, records in batch.items()
                    for record in records
                ]
                try:
                    await deliver_batch(sub, items, self, self._policy)
                except Exception:
                    # Not settled (e.g. the database is down): rewind, so that this batch is
                    # fetched again rather than skipped by the in-memory position.
                    for tp, records in batch.items():
                        consumer.seek(tp, records[0].offset)
                    raise
                offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
                try:
                    await consumer.commit(offsets)
                except CommitFailedError as exc:
                    # A rebalance took the partitions: their new owner redelivers, and the
                    # inbox makes that a no-op.
                    _log.warning("commit failed after rebalance: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("consumer %s: %s, backing off", sub.consumer, exc, exc_info=True)
                await asyncio.sleep(1.0)

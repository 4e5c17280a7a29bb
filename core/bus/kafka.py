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
* **A broker that lost its log.** The bus remembers the highest offset the broker
  acknowledged per partition. A later acknowledgement below it, or end offsets below it
  (:meth:`KafkaBus.log_lost`, asked by the relay when idle), or its topics gone, mean the
  broker lost records it had acknowledged: the topics are created again and
  :class:`~core.errors.BrokerLogLost` tells the relay to publish the outbox again from
  its start (core/outbox.py); inboxes make the repeats no-ops. The consumers must then
  read the new log from its start too: their positions (and offsets a consumer committed
  to the new broker before it noticed) point past records the relay publishes again.
  The consumers of the bus that noticed are started again once the topics are made
  again, and read from the start (:meth:`KafkaBus._repair`); a consumer in another process
  rewinds when its watchdog finds its position or committed offset past the log's end.
* **Dead letters.** Records no retry can fix go to ``<prefix>.dlq`` with the original
  bytes and key, and headers ``reason``, ``consumer``, ``original_topic``, ``attempts``
  (and ``event_id``/``event_type`` when known); they are also kept in PostgreSQL when a
  table sink is given. The consumer then moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

from core.bus.base import DeadLetter, DeadLetterSink, Subscription
from core.bus.delivery import Delivery, RetryPolicy, dead_letters_from_zero, deliver_batch
from core.config import Settings
from core.errors import BrokerLogLost, BusError
from core.events import Envelope, Topic
from core.metrics import EVENTS_PUBLISHED

__all__ = ["KafkaBus"]

_log = logging.getLogger(__name__)
_START_TIMEOUT_S = 20.0
_COMMIT_TIMEOUT_S = 10.0


@dataclass
class _Running:
    """One subscription's consumer and its loop; ``progress_at``: when it last settled."""

    sub: Subscription
    consumer: AIOKafkaConsumer
    task: asyncio.Task[None]
    progress_at: float = field(default_factory=time.monotonic)
    rewind: bool = False  # the broker lost its log: read its partitions from the start


async def _stop_quietly(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer``, whatever it raises: aiokafka's ``stop`` can raise the
    CancelledError of its own fetch tasks, which it cancels and awaits. (Still cancelled
    when the task stopping it is.)"""
    try:
        await asyncio.wait_for(consumer.stop(), 10)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as exc:
        _log.debug("stopping a consumer: %s", exc)


class KafkaBus:
    def __init__(
        self,
        settings: Settings,
        dead_letters_table: DeadLetterSink | None = None,
        policy: RetryPolicy | None = None,
        *,
        client_id: str = "upi-engine",
        stall_s: float = 60.0,
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
        self._running: dict[str, _Running] = {}  # by consumer name
        self._watchdog: asyncio.Task[None] | None = None
        self._stall_s = stall_s
        self._restarts = 0
        self._stopping = asyncio.Event()
        self._acked: dict[TopicPartition, int] = {}  # highest offset the broker acknowledged
        self._floor: dict[TopicPartition, int] = {}  # first offset of the last publish
        self._probe: AIOKafkaConsumer | None = None
        self._repair_topics = False  # a lost log's topics are still to be checked
        self._restarting: dict[str, asyncio.Lock] = {}  # one restart of a consumer at a time
        self._background: set[asyncio.Task[None]] = set()

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
        dead_letters_from_zero(subscription.consumer)
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
        probe = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, client_id=f"{self._client_id}-probe", group_id=None
        )
        try:
            await asyncio.wait_for(probe.start(), _START_TIMEOUT_S)
        except (TimeoutError, KafkaError) as exc:
            raise BusError(f"cannot start the Kafka offsets probe: {exc!r}") from exc
        self._probe = probe
        # Side by side: each consumer's first group join waits out the broker's rebalance
        # delay (seconds on Tansu), which one after another added up to 40 s of start.
        started = await asyncio.gather(
            *(self._start_consumer(sub) for sub in self._subs), return_exceptions=True
        )
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]
        self._watchdog = asyncio.create_task(self._watch_consumers(), name="kafka-watchdog")

    async def _start_consumer(self, sub: Subscription, *, rewind: bool = False) -> None:
        consumer = AIOKafkaConsumer(
            *(self.topic_name(t) for t in sub.topics),
            bootstrap_servers=self._settings.kafka_bootstrap,
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
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise BusError(f"cannot start consumer {sub.consumer}: {exc!r}") from exc
        self._running[sub.consumer] = _Running(
            sub,
            consumer,
            asyncio.create_task(self._consume(sub, consumer), name=f"consume-{sub.consumer}"),
            rewind=rewind,
        )

    async def _watch_consumers(self) -> None:
        """A consumer that has settled nothing for ``stall_s`` while records wait on its
        partitions is started again. After a broker restart or a partition aiokafka has
        been seen to sit for good in a rejoin or a commit; a fresh consumer rejoins the
        group and is redelivered what was not committed (a no-op through the inboxes)."""
        while not self._stopping.is_set():
            await asyncio.sleep(min(5.0, self._stall_s / 3))
            for name, running in list(self._running.items()):
                try:
                    if not running.rewind and await self._past_the_log(running):
                        _log.error("consumer %s is past the end of the broker's log", name)
                        running.rewind = True
                except Exception as exc:  # the broker is away, or the consumer rejoining
                    _log.debug("watchdog: %s: %s", name, exc)
                if time.monotonic() - running.progress_at < self._stall_s:
                    continue
                try:
                    waiting = await self._waiting(running)
                except Exception as exc:  # the broker is away: nothing to compare with
                    _log.debug("watchdog: %s: %s", name, exc)
                    continue
                if waiting:
                    _log.warning(
                        "consumer %s settled nothing for %.0f s with %d records waiting;"
                        " starting it again",
                        name,
                        time.monotonic() - running.progress_at,
                        waiting,
                    )
                    await self._restart(running)

    async def _rewind(self, running: _Running) -> None:
        """Read every assigned partition from the start of the (new) log, and commit that,
        so that a rebalance does not bring back an offset past what the broker holds."""
        parts = running.consumer.assignment()
        if not parts:
            return  # rejoining: rewound once it has partitions again
        await running.consumer.seek_to_beginning(*parts)
        await asyncio.wait_for(running.consumer.commit({tp: 0 for tp in parts}), _COMMIT_TIMEOUT_S)
        running.rewind = False
        _log.warning(
            "consumer %s: reading %d partitions again from the start of the log",
            running.sub.consumer,
            len(parts),
        )

    async def _past_the_log(self, running: _Running) -> bool:
        """Whether the consumer's position or committed offset is past the high watermark
        its last fetch reported: the broker lost records (the relay, maybe in another
        process, publishes them again below that offset). The fetch's high watermark, not
        ListOffsets: Tansu answers that one with the offset after a batch's first record.
        (Kafka answers such a fetch "out of range" and aiokafka resets by itself; Tansu
        answers it empty.)"""
        consumer = running.consumer
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = await asyncio.wait_for(consumer.position(tp), 2)
            committed = await asyncio.wait_for(consumer.committed(tp), 2)
            if max(position, committed or 0) > highwater:
                return True
        return False

    async def lag(self) -> dict[str, int]:
        """Per consumer, the records on its partitions past its group's committed offset
        (a consumer whose lag cannot be read now is left out)."""
        lags = {}
        for name, running in list(self._running.items()):
            with contextlib.suppress(Exception):
                lags[name] = await self._waiting(running)
        return lags

    async def _waiting(self, running: _Running) -> int:
        """Records on the consumer's own partitions past its committed offset. (A consumer with no
        partitions is left alone: in a group with more members than partitions that is
        normal.)"""
        assert self._probe is not None
        partitions = [
            TopicPartition(self.topic_name(t), p)
            for t in running.sub.topics
            for p in range(self._settings.kafka_partitions)
        ]
        ends = await asyncio.wait_for(self._probe.end_offsets(partitions), 5)
        assigned = running.consumer.assignment()
        waiting = 0
        for tp, end in ends.items():
            if tp not in assigned:
                continue
            # Against the committed offset, not the position: the position moves when
            # records are fetched, a commit only once they are settled.
            try:
                committed = await asyncio.wait_for(running.consumer.committed(tp), 2)
            except (TimeoutError, KafkaError):
                return 1  # the broker answers the probe but not this group: wedged
            waiting += max(0, end - (committed or 0))
        return waiting

    async def _restart(self, running: _Running, *, rewind: bool = False) -> None:
        """A fresh consumer for ``running``'s subscription (``rewind``: reading its partitions
        from the start once it has them). Nothing if it was replaced meanwhile."""
        async with self._restarting.setdefault(running.sub.consumer, asyncio.Lock()):
            if self._running.get(running.sub.consumer) is not running:
                return
            if running.task is asyncio.current_task():  # its own handler published
                running.rewind = running.rewind or rewind
                return
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(running.task, 10)
            await _stop_quietly(running.consumer)
            self._restarts += 1
            try:
                await self._start_consumer(running.sub, rewind=rewind)
            except BusError as exc:
                _log.warning("restarting a consumer: %s", exc)  # the watchdog tries again
                running.progress_at = time.monotonic()
                running.rewind = running.rewind or rewind

    async def _repair(self) -> None:
        """After a lost log, before anything is published again: the topics as configured,
        then every consumer of this bus started again, to read the new log from its start.

        Started again, not only rewound where it stands: until the topics are made again a
        consumer may hold the partitions of a topic the restarted broker made itself (at
        its own partition count), and have read and committed records there, which the
        repair deletes. A rewind of those partitions, or a position carried over from them,
        says nothing of the new topic's: a fresh consumer joins with the new metadata, and
        its rewind (seek to the beginning, commit 0) applies to what it is given then.
        In the background, side by side: a consumer's join takes seconds (Tansu's rebalance
        delay), and the relay goes on publishing the outbox again meanwhile."""
        await self._create_topics(repair=True)
        self._repair_topics = False
        if self._stopping.is_set() or not self._running:
            return
        for running in list(self._running.values()):
            task = asyncio.create_task(
                self._restart(running, rewind=True), name=f"again-{running.sub.consumer}"
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _create_topics(self, *, repair: bool = False) -> None:
        """Create the topics that are missing; with ``repair`` (after a lost log), make again
        those at another partition count than ``kafka_partitions``."""
        names = [self.topic_name(t.value) for t in Topic] + [self.dlq_topic]
        want = self._settings.kafka_partitions
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
            for _ in range(3):
                # Every topic's partitions, without the auto-creation a request naming
                # topics would ask for.
                counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
                wrong = [n for n in names if counts.get(n, want) != want] if repair else []
                if wrong:
                    # The restarted broker made them itself, at its own partition count, for
                    # a client asking before we did: records sent to a partition it lacks
                    # are acknowledged and kept nowhere (Tansu). Whatever they hold the
                    # relay publishes again after a loss: made again, at the right count.
                    _log.warning("Kafka topics at the wrong partition count: %s", wrong)
                    with contextlib.suppress(UnknownTopicOrPartitionError):
                        await admin.delete_topics(wrong)
                missing = [n for n in names if n not in counts or n in wrong]
                if not missing:
                    break
                topics = [NewTopic(n, num_partitions=want, replication_factor=1) for n in missing]
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(topics)
        finally:
            await admin.close()
        if repair and self._producer is not None:
            # Its metadata still holds the lost log's partitions.
            await self._producer.client.force_metadata_update()

    async def stop(self) -> None:
        self._stopping.set()
        tasks = [r.task for r in self._running.values()] + list(self._background)
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        consumers = [r.consumer for r in self._running.values()]
        for consumer in [*consumers, *([self._probe] if self._probe else [])]:
            await _stop_quietly(consumer)
        self._probe = None
        self._watchdog = None
        self._running.clear()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        self._producer = None

    # ------------------------------------------------------------------ publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        producer = self._producer
        if producer is None:
            raise BusError("Kafka bus is not started")
        if self._repair_topics:
            try:
                await self._repair()
            except KafkaError as exc:
                raise BusError(f"cannot make the topics again: {exc!r}") from exc
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
            acks = await asyncio.gather(*futures)
        except UnknownTopicOrPartitionError as exc:
            await self._lost(f"its topics are gone ({exc!r})")
        except KafkaError as exc:
            raise BusError(f"publish failed: {exc!r}") from exc
        for envelope in envelopes:
            EVENTS_PUBLISHED.labels(envelope.topic).inc()
        went_back = False
        first: dict[TopicPartition, int] = {}
        for ack in acks:
            tp = TopicPartition(ack.topic, ack.partition)
            went_back |= ack.offset <= self._acked.get(tp, -1)
            self._acked[tp] = max(ack.offset, self._acked.get(tp, -1))
            first[tp] = min(ack.offset, first.get(tp, ack.offset))
        self._floor.update(first)
        if went_back:
            await self._lost("it acknowledged offsets it had given before")

    async def log_lost(self) -> None:
        """Raise BrokerLogLost if the broker lost records it acknowledged: the relay asks
        this when it has nothing to publish, to notice a loss at once."""
        if self._probe is None or not self._floor:
            return
        try:
            ends = await self._probe.end_offsets(list(self._floor))
        except UnknownTopicOrPartitionError as exc:
            await self._lost(f"its topics are gone ({exc!r})")
        except KafkaError as exc:
            raise BusError(f"cannot read end offsets: {exc!r}") from exc
        # Compared with the first offset of the last publish, not its last: brokers differ
        # on the end offset of a batch (Kafka: after its last record; Tansu: after its first).
        behind = [tp for tp, end in ends.items() if end <= self._floor[tp]]
        if behind:
            await self._lost(f"end offsets are below what it acknowledged on {len(behind)}")

    async def _lost(self, why: str) -> NoReturn:
        self._acked.clear()
        self._floor.clear()
        _log.error("the Kafka broker lost its log: %s", why)
        for running in self._running.values():
            running.rewind = True
        self._repair_topics = True
        try:
            await self._repair()
        except Exception as exc:  # the broker is away again: the next publish tries again
            _log.warning("cannot make the topics again yet: %s", exc)
        raise BrokerLogLost(f"the broker lost its log: {why}")

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
                running = self._running.get(sub.consumer)
                if running is not None and running.rewind:
                    await self._rewind(running)
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
                running = self._running.get(sub.consumer)
                if running is not None:
                    running.progress_at = time.monotonic()
                offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
                try:
                    # aiokafka retries a commit until the coordinator answers, for ever if
                    # the broker went away: bounded here, so the consumer goes on.
                    await asyncio.wait_for(consumer.commit(offsets), _COMMIT_TIMEOUT_S)
                except CommitFailedError as exc:
                    # A rebalance took the partitions: their new owner redelivers, and the
                    # inbox makes that a no-op.
                    _log.warning("commit failed after rebalance: %s", exc)
                except TimeoutError:
                    # Not committed: redelivered after a restart or rebalance, a no-op then.
                    _log.warning("consumer %s: commit timed out; going on", sub.consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("consumer %s: %s, backing off", sub.consumer, exc, exc_info=True)
                await asyncio.sleep(1.0)

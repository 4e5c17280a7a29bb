"""The Kafka backend against the real Tansu broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text

from core.bus.base import Subscription
from core.bus.kafka import KafkaBus
from core.config import Settings
from core.deadletters import TableDeadLetters
from core.errors import BusError
from core.events import CATALOGUE, Envelope, PaymentInitiated
from tests.support import unique_name

pytestmark = pytest.mark.kafka


def settings(bootstrap: str, **extra: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "kafka_idempotence": False,
        "kafka_topic_prefix": unique_name("k"),
        "kafka_partitions": 3,
        "consumer_max_attempts": 3,
        "consumer_retry_base_s": 0.01,
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


def envelope(n: int, key: str) -> Envelope:
    event = PaymentInitiated(
        transaction_id=f"UPI{n}",
        merchant_id="m",
        merchant_order_id=str(n),
        payer_vpa="alice@ybl",
        payee_vpa="bob@ybl",
        amount_paise=n + 1,
        initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return Envelope.wrap(event, partition_key=key)


async def _publish_when_the_broker_answers(bus: KafkaBus, envelopes: list[Envelope]) -> None:
    for _ in range(40):
        try:
            await bus.publish(envelopes)
            return
        except BusError:
            await asyncio.sleep(0.5)
    raise AssertionError("the broker never took the publish")


async def _publish_until_the_loss_is_noticed(bus: KafkaBus, envelopes: list[Envelope]) -> None:
    """Publish (once the restarted broker answers) until the bus says the log was lost."""
    from core.errors import BrokerLogLost

    for _ in range(40):
        try:
            await bus.publish(envelopes)
        except BrokerLogLost:
            return
        except BusError:
            await asyncio.sleep(0.5)
    raise AssertionError("the bus never noticed the lost log")


async def _made_by_the_broker(bootstrap: str, topic: str) -> dict[str, int]:
    """Name ``topic`` to the (restarted) broker once it answers, so that it makes the topic
    itself, at its own partition count, as a client's metadata request after a restart
    does; every topic's partition count then."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    for _ in range(40):
        try:
            await admin.start()
            break
        except Exception:
            await asyncio.sleep(0.5)
    try:
        await admin.describe_topics([topic])
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def eventually(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_events_arrive_in_order_per_partition_key(kafka_bootstrap):
    s = settings(kafka_bootstrap)
    seen: dict[str, list[int]] = {}

    async def handle(e: Envelope) -> None:
        seen.setdefault(e.partition_key, []).append(e.payload["amount_paise"])

    consumer_bus = KafkaBus(s)
    consumer_bus.subscribe(Subscription("orders", ("payments",), handle))
    publisher = KafkaBus(s)
    await publisher.start()
    await consumer_bus.start()
    try:
        await publisher.publish([envelope(i, f"payer-{i % 5}") for i in range(100)])

        async def all_seen() -> bool:
            return sum(map(len, seen.values())) == 100

        await eventually(all_seen)
        for amounts in seen.values():
            assert amounts == sorted(amounts)
    finally:
        await consumer_bus.stop()
        await publisher.stop()


@pytest.mark.slow
async def test_killed_after_effect_before_commit_redelivers_without_a_second_effect(
    kafka_bootstrap, db, db_url
):
    s = settings(kafka_bootstrap)
    async with db.transaction() as conn:
        await conn.execute(text("CREATE TABLE effects (event_id uuid PRIMARY KEY)"))
        await conn.execute(text("CREATE TABLE deliveries (event_id uuid NOT NULL)"))
    publisher = KafkaBus(s)
    await publisher.start()
    n = 10
    await publisher.publish([envelope(i, "one-payer") for i in range(n)])
    await publisher.stop()
    script = [
        sys.executable,
        "-m",
        "tests.integration.kafka_crash_consumer",
        db_url,
        kafka_bootstrap,
        s.kafka_topic_prefix,
        str(n),
    ]
    crashed = await asyncio.to_thread(subprocess.run, [*script, "--crash"], timeout=60)
    assert crashed.returncode == -9
    finished = await asyncio.to_thread(subprocess.run, script, timeout=60)
    assert finished.returncode == 0
    async with db.connection() as conn:
        effects = (await conn.execute(text("SELECT count(*) FROM effects"))).scalar_one()
        deliveries = (
            await conn.execute(
                text(
                    "SELECT event_id, count(*) AS n FROM deliveries"
                    " GROUP BY event_id ORDER BY n DESC"
                )
            )
        ).all()
    assert effects == n
    assert len(deliveries) == n
    assert deliveries[0].n == 2, "the event handled before the kill was redelivered"
    assert sum(d.n for d in deliveries) == n + 1


async def test_poison_goes_to_the_dead_letter_topic_and_the_consumer_keeps_going(
    kafka_bootstrap, db
):
    s = settings(kafka_bootstrap)
    handled: list[str] = []

    async def handle(e: Envelope) -> None:
        CATALOGUE.decode(e)  # an unknown type is poison
        handled.append(e.transaction_id or "")

    bus = KafkaBus(s, TableDeadLetters(db))
    bus.subscribe(Subscription("ledgerish", ("payments",), handle))
    await bus.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        topic = f"{s.kafka_topic_prefix}.payments"
        await producer.send_and_wait(topic, b"\x00not json at all", key=b"k")
        unknown = envelope(1, "k")
        bad = Envelope(
            **{
                **{f: getattr(unknown, f) for f in unknown.__dataclass_fields__},
                "event_type": "NoSuchEvent",
            }
        )
        await producer.send_and_wait(topic, bad.to_bytes(), key=b"k")
        await bus.publish([envelope(2, "k")])

        async def good_one_handled() -> bool:
            return handled == ["UPI2"]

        await eventually(good_one_handled)
        dlq = AIOKafkaConsumer(
            f"{s.kafka_topic_prefix}.dlq",
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            group_id=unique_name("dlq-reader"),
        )
        await dlq.start()
        try:
            letters = []
            deadline = asyncio.get_running_loop().time() + 20
            while len(letters) < 2 and asyncio.get_running_loop().time() < deadline:
                for records in (await dlq.getmany(timeout_ms=500)).values():
                    letters += records
        finally:
            await dlq.stop()
        reasons = sorted(dict(r.headers)["reason"].decode() for r in letters)
        assert len(letters) == 2
        assert "not JSON" in reasons[0] or "not JSON" in reasons[1]
        assert any("unknown event type 'NoSuchEvent'" in r for r in reasons)
        assert all(dict(r.headers)["consumer"] == b"ledgerish" for r in letters)
        assert {r.value for r in letters} >= {b"\x00not json at all"}
        async with db.connection() as conn:
            rows = (await conn.execute(text("SELECT consumer, reason FROM dead_letters"))).all()
        assert len(rows) == 2 and {r.consumer for r in rows} == {"ledgerish"}
    finally:
        await producer.stop()
        await bus.stop()


async def test_transient_failures_are_retried_and_persistent_ones_dead_lettered(
    kafka_bootstrap, db
):
    s = settings(kafka_bootstrap)
    attempts: dict[str, int] = {}
    done: list[str] = []

    async def handle(e: Envelope) -> None:
        txn = e.transaction_id or ""
        attempts[txn] = attempts.get(txn, 0) + 1
        if txn == "UPI1" and attempts[txn] < 3:
            raise ConnectionError("database blip")
        if txn == "UPI2":
            raise RuntimeError("this one always fails")
        done.append(txn)

    bus = KafkaBus(s, TableDeadLetters(db))
    bus.subscribe(Subscription("flaky", ("payments",), handle))
    await bus.start()
    try:
        await bus.publish([envelope(1, "k"), envelope(2, "k"), envelope(3, "k")])

        async def settled() -> bool:
            return done == ["UPI1", "UPI3"]

        await eventually(settled)
        assert attempts == {"UPI1": 3, "UPI2": 3, "UPI3": 1}
        async with db.connection() as conn:
            [row] = (await conn.execute(text("SELECT reason, attempts FROM dead_letters"))).all()
        assert "this one always fails" in row.reason and row.attempts == 3
    finally:
        await bus.stop()


async def test_idempotent_producer_against_a_broker_that_refuses_it_fails_clearly(kafka_bootstrap):
    bus = KafkaBus(settings(kafka_bootstrap, kafka_idempotence=True))
    with pytest.raises(BusError, match="UPI_KAFKA_IDEMPOTENCE=false"):
        await asyncio.wait_for(bus.start(), 60)
    await bus.stop()


async def test_a_consumer_stuck_with_records_waiting_is_started_again(kafka_bootstrap):
    # The first delivery never returns (as a consumer sat for good after a broker fault);
    # the watchdog sees records waiting and no progress, and starts the consumer again,
    # which is redelivered the uncommitted records.
    s = settings(kafka_bootstrap)
    stuck = asyncio.Event()
    handled: list[int] = []

    async def handle(e: Envelope) -> None:
        if not stuck.is_set():
            stuck.set()
            await asyncio.Event().wait()  # for ever (until cancelled)
        handled.append(e.payload["amount_paise"])

    bus = KafkaBus(s, stall_s=1.5)
    bus.subscribe(Subscription("stuck", ("payments",), handle))
    publisher = KafkaBus(s)
    await publisher.start()
    await bus.start()
    try:
        await publisher.publish([envelope(i, "one-payer") for i in range(5)])

        async def all_handled() -> bool:
            return sorted(set(handled)) == [1, 2, 3, 4, 5]

        await eventually(all_handled, timeout=60)
        assert bus._restarts >= 1
    finally:
        await bus.stop()
        await publisher.stop()


async def test_the_trace_context_in_the_envelope_survives_kafka(kafka_bootstrap):
    """core/tracing.py: the W3C context travels in the envelope's bytes, so a consumer
    across the broker continues the publisher's trace."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from core import tracing

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing.use(provider)
    s = settings(kafka_bootstrap)
    received: list[Envelope] = []

    async def handle(e: Envelope) -> None:
        with tracing.span_for(e, "consume"):
            received.append(e)

    consumer_bus = KafkaBus(s)
    consumer_bus.subscribe(Subscription("traced", ("payments",), handle))
    publisher = KafkaBus(s)
    await publisher.start()
    await consumer_bus.start()
    try:
        with tracing.span_for(None, "request", start_trace=True):
            sent = [envelope(1, "payer-1"), envelope(2, "payer-2")]
        untraced = envelope(3, "payer-3")  # no span current: no context
        assert untraced.headers == {}
        await publisher.publish([*sent, untraced])

        async def all_seen() -> bool:
            return len(received) == 3

        await eventually(all_seen)
    finally:
        await consumer_bus.stop()
        await publisher.stop()
        tracing.use(None)
        provider.shutdown()
    by_id = {e.event_id: e for e in received}
    for e in sent:
        assert "traceparent" in e.headers
        assert by_id[e.event_id].headers == e.headers
    assert [e.headers for e in received if e.event_id not in {x.event_id for x in sent}] == [{}]
    [request] = [span for span in exported.get_finished_spans() if span.name == "request"]
    consumed = [span for span in exported.get_finished_spans() if span.name == "consume"]
    assert len(consumed) == 2, "the untraced event got no span"
    for span in consumed:
        assert span.context.trace_id == request.context.trace_id
        assert span.parent is not None and span.parent.span_id == request.context.span_id


async def test_after_the_broker_lost_its_log_the_consumers_read_the_new_log_from_its_start(
    caplog,
):
    """The broker restarts empty; the records published again (as the relay does after the
    loss) land in the new log at offsets below the consumer's position. The consumers of the
    bus that noticed read the new log from its start (and commit that), not from their old
    positions."""
    from tests.support import Tansu

    broker = Tansu().start()
    # Tansu's own partition count: a publish racing the bus's CreateTopics after the restart
    # may auto-create the topic, and the records' partition must not depend on which won.
    s = settings(f"127.0.0.1:{broker.port}", kafka_partitions=4)
    seen: set[str] = set()

    async def handle(e: Envelope) -> None:
        seen.add(e.payload["transaction_id"])

    bus = KafkaBus(s)
    bus.subscribe(Subscription("orders", ("payments",), handle))
    try:
        await bus.start()
        await bus.publish([envelope(i, "payer") for i in range(20)])

        async def all_first() -> bool:
            return len(seen) == 20

        await eventually(all_first)
        broker.kill()
        broker.start()  # same port, empty log
        seen.clear()
        again = [envelope(i, "payer") for i in range(8)]
        await _publish_until_the_loss_is_noticed(bus, again)
        # The publish that noticed may have gone to a topic the restarted broker had not
        # made yet (Tansu acknowledges it and keeps nothing): the relay publishes the whole
        # outbox again after a loss, and so does this test.
        await _publish_when_the_broker_answers(bus, [envelope(i, "payer") for i in range(12)])

        async def all_again() -> bool:
            return len(seen) == 12

        await eventually(all_again, timeout=40)
        assert "again from the start of the log" in caplog.text
    finally:
        await bus.stop()
        broker.stop()


async def test_a_topic_the_restarted_broker_made_at_its_own_partition_count_is_made_again():
    """After the restart a client's metadata request makes the broker create the topic
    itself, at its default partition count (Tansu: 4), before the bus can: records the bus's
    producer sends to the partitions the lost log had beyond those are acknowledged and kept
    nowhere. The bus that notices the loss makes the topic again at its configured count,
    so what the relay publishes again is all read."""
    from aiokafka.admin import AIOKafkaAdminClient

    from tests.support import Tansu

    broker = Tansu().start()
    s = settings(f"127.0.0.1:{broker.port}", kafka_partitions=6)
    seen: set[str] = set()

    async def handle(e: Envelope) -> None:
        seen.add(e.payload["transaction_id"])

    bus = KafkaBus(s)
    bus.subscribe(Subscription("orders", ("payments",), handle))
    # Keys spread over every partition (one payer per payment).
    batch = [envelope(i, f"payer{i}") for i in range(40)]
    try:
        await bus.start()
        await bus.publish(batch)

        async def all_seen() -> bool:
            return len(seen) == 40

        await eventually(all_seen)
        broker.kill()
        broker.start()  # same port, empty log
        topic = bus.topic_name("payments")
        made = await _made_by_the_broker(s.kafka_bootstrap, topic)
        assert made[topic] != 6, made  # else this test shows nothing
        seen.clear()
        await _publish_until_the_loss_is_noticed(bus, batch)
        await _publish_when_the_broker_answers(bus, batch)  # the relay's republication
        await eventually(all_seen, timeout=40)
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
        await admin.start()
        try:
            now = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
        finally:
            await admin.close()
        assert now[topic] == 6
    finally:
        await bus.stop()
        broker.stop()


async def test_what_a_consumer_read_from_the_broker_s_own_topic_does_not_hide_the_new_log():
    """The restarted broker made the topic itself, at its own partition count, and records
    landed there before the bus noticed the loss (another producer's, or the relay's first
    publishes after the restart): the consumer read them and committed their offsets. The
    topic is then made again at the configured count and the outbox published again: the
    consumer must read the new topic from its start, not from the offsets it committed on
    the one that was deleted."""
    from tests.support import Tansu

    broker = Tansu().start()
    s = settings(f"127.0.0.1:{broker.port}", kafka_partitions=6)
    seen: set[str] = set()

    async def handle(e: Envelope) -> None:
        seen.add(e.payload["transaction_id"])

    bus = KafkaBus(s, stall_s=3.0)
    bus.subscribe(Subscription("orders", ("payments",), handle))
    batch = [envelope(i, f"payer{i}") for i in range(60)]
    try:
        await bus.start()
        await bus.publish(batch)

        async def all_seen() -> bool:
            return len(seen) == 60

        await eventually(all_seen)
        broker.kill()
        broker.start()  # same port, empty log
        topic = bus.topic_name("payments")
        await _made_by_the_broker(s.kafka_bootstrap, topic)
        # Records in the broker's topic, read and committed by the consumer before the loss
        # is noticed (as the relay's first publishes after the restart are): a few on each
        # of its partitions, about half of what the new log will hold there.
        early = [envelope(1000 + i, f"early{i}") for i in range(24)]
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
        await producer.start()
        try:
            for e in early:
                await producer.send(topic, value=e.to_bytes(), key=e.partition_key.encode())
            await producer.flush()
        finally:
            await producer.stop()

        async def early_seen() -> bool:
            return {f"UPI{1000 + i}" for i in range(24)} <= seen

        await eventually(early_seen, timeout=40)
        seen.clear()
        await _publish_until_the_loss_is_noticed(bus, batch)
        await _publish_when_the_broker_answers(bus, batch)  # the relay's republication
        await eventually(all_seen, timeout=60)
    finally:
        await bus.stop()
        broker.stop()

"""The fraud consumer's batches in the real PostgreSQL: the same decisions as one payment
at a time, redelivery, a poison event, a crash before commit, statements per batch."""

from __future__ import annotations

import dataclasses
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, text

import fraud.assessor
from core.bus.base import DeadLetter
from core.bus.delivery import Delivery, RetryPolicy, deliver_batch
from core.clock import FakeClock
from core.config import Settings
from core.crypto import MasterKey
from core.errors import PoisonMessage
from core.events import CATALOGUE, DeviceInfo, Envelope, FraudAssessed, PaymentInitiated
from core.pii import Vpa, unkeyed_partition_key
from fraud.assessor import FraudAssessor, txn_of
from fraud.features import Txn
from fraud.simulator import simulate
from fraud.store import split_rounds

pytestmark = pytest.mark.postgres

KEY = MasterKey(os.urandom(32))
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
FRAUD_TABLES = ("fraud_observations", "fraud_payers", "fraud_payer_devices")


def envelope_of(transaction_id: str, txn: Txn) -> Envelope:
    device = None
    if txn.device_id is not None:
        lat, lon = txn.location or (None, None)
        device = DeviceInfo(
            id=txn.device_id,
            latitude=lat,
            longitude=lon,
            emulator=txn.emulator or None,
            rooted=txn.rooted or None,
        )
    initiated = PaymentInitiated(
        transaction_id=transaction_id,
        merchant_id="mer_1",
        merchant_order_id=transaction_id,
        payer_vpa=Vpa(txn.payer),
        payee_vpa=Vpa(txn.payee),
        amount_paise=txn.amount_paise,
        device=device,
        initiated_at=txn.at,
    )
    return Envelope.wrap(
        initiated, partition_key=unkeyed_partition_key(txn.payer), occurred_at=txn.at
    )


def payments(n: int, start: int = 0, **kw: object) -> list[Envelope]:
    """``n`` payments by distinct payers on distinct phones, a second apart."""
    out = []
    for i in range(start, start + n):
        txn = Txn(
            payer=str(kw.get("payer", f"payer{i}@okhdfc")),
            payee="shop@okicici",
            amount_paise=25_000 + i,
            at=T0 + timedelta(seconds=i),
            device_id=str(kw.get("device", f"phone-{i}")),
            location=(19.07, 72.87),
        )
        out.append(envelope_of(f"UPI{i:010d}", txn))
    return out


def assessor(db, **settings: float) -> FraudAssessor:
    return FraudAssessor.from_settings(
        Settings(**settings), db, KEY, FakeClock(T0 + timedelta(days=1))
    )


def patient(db) -> FraudAssessor:
    """Budgets no loaded machine overruns: the tests comparing numbers must not depend on
    a scorer being skipped because the CPU was busy."""
    return assessor(db, fraud_rule_budget_ms=10_000, fraud_model_budget_ms=10_000)


async def decisions(db) -> list[tuple[Envelope, FraudAssessed]]:
    async with db.connection() as conn:
        rows = (
            await conn.execute(
                text("SELECT envelope FROM outbox WHERE event_type = 'FraudAssessed' ORDER BY id")
            )
        ).scalars()
        envelopes = [Envelope.from_bytes(bytes(r)) for r in rows]
    return [(e, CATALOGUE.decode_as(e, FraudAssessed)) for e in envelopes]


async def counts(db) -> dict[str, int]:
    async with db.connection() as conn:
        found = {
            table: (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in (*FRAUD_TABLES, "inbox", "outbox")
        }
        found["payer_payments"] = (
            await conn.execute(text("SELECT coalesce(sum(payments), 0) FROM fraud_payers"))
        ).scalar_one()
    return found


async def history_rows(db) -> dict[str, list[tuple[object, ...]]]:
    async with db.connection() as conn:
        return {
            "observations": [
                tuple(r)
                for r in await conn.execute(
                    text(
                        "SELECT transaction_id, payer_key, device_key, payee_key, amount_paise,"
                        " at, lat, lon FROM fraud_observations ORDER BY transaction_id"
                    )
                )
            ],
            "payers": [
                tuple(r) for r in await conn.execute(text("SELECT * FROM fraud_payers ORDER BY 1"))
            ],
            "devices": [
                tuple(r)
                for r in await conn.execute(text("SELECT * FROM fraud_payer_devices ORDER BY 1, 2"))
            ],
        }


def outcome(d: FraudAssessed) -> tuple[object, ...]:
    return (d.decision, d.score, d.scores, d.reasons, d.skipped, d.model_version)


async def test_a_batch_decides_exactly_as_one_payment_at_a_time(db):
    """Simulated traffic (every typology) plus a flash sale that takes a shop past the
    fan-in rule in the middle of a batch, through the database: once handled one event at a
    time, once in batches of 100; the same decisions, scores and recorded history."""
    traffic = [item.txn for item in simulate(11, payers=120, days=1.0, scale=0.08)]
    sale_at = traffic[len(traffic) // 2].at
    sale = [
        Txn(f"buyer{n}@okaxis", "flashsale@okicici", 99_900, sale_at + timedelta(seconds=n))
        for n in range(45)
    ]
    stream = sorted([*traffic, *sale], key=lambda t: t.at)
    envelopes = [envelope_of(f"UPI{n:010d}", txn) for n, txn in enumerate(stream)]
    batches = [envelopes[i : i + 100] for i in range(0, len(envelopes), 100)]

    one_by_one = patient(db)
    for envelope in envelopes:
        await one_by_one.handle(envelope)
    one_by_one.close()
    sequential = {d.transaction_id: outcome(d) for _, d in await decisions(db)}
    sequential_history = await history_rows(db)
    async with db.connection() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(FRAUD_TABLES)}, inbox, outbox"))
        await conn.commit()

    batched = patient(db)
    for batch in batches:
        await batched.assess_batch(batch)
    batched.close()
    found = await decisions(db)
    in_batches = {d.transaction_id: outcome(d) for _, d in found}

    assert len(in_batches) == len(envelopes) == len(found)
    assert in_batches == sequential
    assert await history_rows(db) == sequential_history
    # What makes it a real test: payers and phones came back within a batch, and the
    # decisions used the history the batch itself made.
    rounds = [
        len(split_rounds([txn_of(CATALOGUE.decode_as(e, PaymentInitiated)) for e in batch]))
        for batch in batches
    ]
    assert max(rounds) > 3, rounds
    reasons = {r for outcome_ in in_batches.values() for r in outcome_[3]}  # type: ignore[attr-defined]
    assert {
        "VELOCITY_PAYER_1M",
        "VELOCITY_PAYEE_FAN_IN",
        "DEVICE_SHARED",
        "PAYEE_NEW_FAN_IN",
        "AMOUNT_STRUCTURING",
    } <= reasons, reasons
    assert not any(outcome_[4] for outcome_ in in_batches.values())  # nothing skipped
    # Published in the batch's order, each caused by its payment, keyed by its payer.
    assert [d.transaction_id for _, d in found] == [
        CATALOGUE.decode(e).transaction_id  # type: ignore[attr-defined]
        for e in envelopes
    ]
    by_txn = {CATALOGUE.decode(e).transaction_id: e for e in envelopes}  # type: ignore[attr-defined]
    for envelope, d in found:
        assert envelope.causation_id == by_txn[d.transaction_id].event_id
        assert envelope.partition_key == by_txn[d.transaction_id].partition_key


async def test_a_payers_second_payment_in_a_batch_sees_the_first(db):
    """A burst of six by one payer within a minute, in one batch among other payers: from
    the fourth on the burst is flagged, as when the payments come one at a time."""
    burst = payments(6, payer="asha@oksbi", device="asha-phone")
    others = payments(6, start=100)
    batch = [x for pair in zip(burst, others, strict=True) for x in pair]
    a = patient(db)
    await a.assess_batch(batch)
    a.close()
    by_txn = {d.transaction_id: d for _, d in await decisions(db)}
    flagged = [
        "VELOCITY_PAYER_1M" in by_txn[CATALOGUE.decode(e).transaction_id].reasons  # type: ignore[attr-defined]
        for e in burst
    ]
    assert flagged == [False, False, False, True, True, True]
    assert not any(
        "VELOCITY_PAYER_1M" in by_txn[CATALOGUE.decode(e).transaction_id].reasons  # type: ignore[attr-defined]
        for e in others
    )
    assert (await counts(db))["payer_payments"] == 12


async def test_a_redelivered_batch_publishes_nothing_twice_and_records_nothing_twice(db):
    first = payments(20) + payments(4, start=50, payer="ravi@ybl", device="ravi-phone")
    a = assessor(db)
    await a.assess_batch(first)
    after_first = await counts(db)
    assert after_first["fraud_observations"] == after_first["payer_payments"] == 24
    assert len(await decisions(db)) == 24

    await a.assess_batch(first)  # the same batch again
    await a.assess_batch([first[3], first[3], first[22]])  # and parts of it, one twice
    assert await counts(db) == after_first

    new = payments(10, start=200) + payments(2, start=54, payer="ravi@ybl", device="ravi-phone")
    mixed = [*first[::3], *new, *first[1::5]]
    await a.assess_batch(mixed)
    a.close()
    after = await counts(db)
    assert after["fraud_observations"] == after["payer_payments"] == 36
    assert after["inbox"] == 36
    found = await decisions(db)
    assert len(found) == 36
    assert len({d.transaction_id for _, d in found}) == 36
    assert len({e.causation_id for e, _ in found}) == 36
    # Ravi's two new payments were scored against his four earlier ones.
    ravi = {d.transaction_id: d for _, d in found}
    assert "VELOCITY_PAYER_1M" in ravi["UPI0000000055"].reasons


class Letters:
    def __init__(self) -> None:
        self.items: list[DeadLetter] = []

    async def dead_letter(self, letter: DeadLetter) -> None:
        self.items.append(letter)


def poisoned(envelope: Envelope) -> Envelope:
    """A PaymentInitiated whose payload no retry can fix."""
    payload = {**envelope.payload, "amount_paise": -5}
    return dataclasses.replace(envelope, event_id=uuid.uuid4(), payload=payload)


async def test_a_poison_event_is_dead_lettered_alone_and_the_rest_of_its_batch_assessed(db):
    good = payments(6)
    bad = poisoned(payments(1, start=90)[0])
    batch = [*good[:3], bad, *good[3:]]
    a = assessor(db)
    with pytest.raises(PoisonMessage):
        await a.assess_batch(batch)
    assert await counts(db) == dict.fromkeys(
        [*FRAUD_TABLES, "inbox", "outbox", "payer_payments"], 0
    )

    letters = Letters()
    items = [Delivery(topic=e.topic, key=e.partition_key, envelope=e) for e in batch]
    policy = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.002)
    await deliver_batch(a.subscription(), items, letters, policy)
    a.close()
    assert [(x.event_id, x.consumer) for x in letters.items] == [(bad.event_id, "fraud-assessor")]
    assert "amount_paise" in letters.items[0].reason
    assessed = {d.transaction_id for _, d in await decisions(db)}
    assert assessed == {CATALOGUE.decode(e).transaction_id for e in good}  # type: ignore[attr-defined]
    assert (await counts(db))["fraud_observations"] == 6


async def test_a_crash_before_commit_leaves_nothing_and_the_redelivery_applies_it_once(
    db, monkeypatch
):
    batch = payments(30) + payments(3, start=40, payer="meera@ybl", device="meera-phone")
    real_append = fraud.assessor.append_to_outbox

    async def append_then_crash(conn, envelopes):
        await real_append(conn, envelopes)  # every insert of the batch is done
        raise RuntimeError("the process died before commit")

    a = assessor(db)
    monkeypatch.setattr(fraud.assessor, "append_to_outbox", append_then_crash)
    with pytest.raises(RuntimeError, match="before commit"):
        await a.assess_batch(batch)
    assert await counts(db) == dict.fromkeys(
        [*FRAUD_TABLES, "inbox", "outbox", "payer_payments"], 0
    )

    monkeypatch.setattr(fraud.assessor, "append_to_outbox", real_append)
    await a.assess_batch(batch)  # the redelivery
    await a.assess_batch(batch)  # and another
    a.close()
    after = await counts(db)
    assert after["fraud_observations"] == after["payer_payments"] == after["inbox"] == 33
    assert len(await decisions(db)) == 33


async def test_a_batch_costs_the_same_few_statements_whatever_its_size(db):
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    def own(found: list[str]) -> list[str]:
        """The statements of the fraud consumer, not of the outbox append (core's)."""
        return [s for s in found if "outbox" not in s]

    a = assessor(db)
    await a.assess_batch(payments(5, start=10_000))  # connections made, types introspected
    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        per_batch: dict[int, int] = {}
        fraud_own: dict[int, int] = {}
        start = 0
        for size in (1, 50, 200):
            statements.clear()
            await a.assess_batch(payments(size, start=start))
            start += size
            per_batch[size] = len(statements)
            fraud_own[size] = len(own(statements))
        # A batch of 50 with a burst: one payer paying five times (five rounds).
        statements.clear()
        await a.assess_batch(
            [*payments(45, start=1_000), *payments(5, start=2_000, payer="burst@ybl", device="b")]
        )
        with_burst = len(statements)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        a.close()
    assert len(set(per_batch.values())) == 1 and per_batch[200] <= 8, per_batch
    # Claim the inbox rows, read the payee windows, read the histories, record them; then
    # the outbox append. Two more for each extra round.
    assert fraud_own == {1: 4, 50: 4, 200: 4}, fraud_own
    assert with_burst == per_batch[50] + 2 * 4, (with_burst, per_batch)

"""The 2025 category limits on the real PostgreSQL (issue 15, part 5): a payer's day per
category beside the general day, what a refused payment leaves behind (nothing, and its
key is free again), and two concurrent initiations that together pass a category's cap."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from core.clock import FakeClock
from core.crypto import MasterKey
from core.errors import LimitExceeded
from core.pii import Vpa, unkeyed_partition_key
from core.storage import Database
from payments import service
from payments.merchants import Merchant, insert_merchant
from payments.repository import payer_key

pytestmark = pytest.mark.postgres

# Seals the payers of the payments these tests make (no engine binds one here).
MASTER = MasterKey(bytes(range(32)))

LAKH = 1_00_000_00
NOW = datetime(2026, 6, 1, 6, 0, tzinfo=UTC)  # 11:30 IST
MERCHANTS = {"mer_grocer": "5411", "mer_insurer": "6300", "mer_jeweller": "5944"}


async def merchants(db: Database) -> None:
    async with db.transaction() as conn:
        for i, (merchant_id, mcc) in enumerate(MERCHANTS.items()):
            shop = Merchant(merchant_id, merchant_id, f"shop{i}@okicici", mcc, None)
            await insert_merchant(conn, shop, b"x", at=NOW)


def command(merchant: str, amount: int, key: str, payer: str = "big.payer@okhdfc"):
    body = {"payer_vpa": payer, "amount_paise": amount, "merchant_order_id": key}
    return service.InitiatePayment(
        merchant_id=merchant,
        idempotency_key=key,
        request_hash=service.request_hash(body),
        payer_vpa=Vpa(payer),
        partition_key=unkeyed_partition_key(payer),
        payee_vpa=None,
        amount_paise=amount,
        merchant_order_id=key,
    )


async def counts(db: Database) -> tuple[int, int, int]:
    async with db.connection() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM payments),"
                    " (SELECT count(*) FROM outbox WHERE event_type = 'PaymentInitiated'),"
                    " (SELECT count(*) FROM idempotency_keys)"
                )
            )
        ).one()
    return tuple(row)  # type: ignore[return-value]


async def test_a_category_day_beside_the_general_day_and_a_refusal_leaves_nothing(db):
    await merchants(db)
    clock = FakeClock(NOW)
    limits = service.PaymentLimits()  # general day ₹1,00,000; insurance ₹10,00,000
    pay = service.initiate_payment
    assert (
        await pay(db, command("mer_grocer", 90_000_00, "g1"), clock, limits, master=MASTER)
    ).status_code == 202
    # ₹5 lakh twice for insurance: the general day (₹90,000 spent of ₹1 lakh) is not in the way.
    for key in ("i1", "i2"):
        done = await pay(db, command("mer_insurer", 5 * LAKH, key), clock, limits, master=MASTER)
        assert done.status_code == 202
    before = await counts(db)
    with pytest.raises(LimitExceeded) as over:
        await pay(db, command("mer_insurer", 100, "i3"), clock, limits, master=MASTER)
    assert over.value.code == "payer_category_daily_amount_exceeded"
    assert over.value.limit_fields() == {"category": "insurance", "limit_paise": 10 * LAKH}
    assert await counts(db) == before, "a refused payment left a payment, an event or a key"
    # The premiums did not use the general day: ₹10,000 more at the grocer fits, a paisa more not.
    with pytest.raises(LimitExceeded) as general:
        await pay(db, command("mer_grocer", 10_000_01, "g2"), clock, limits, master=MASTER)
    assert general.value.code == "payer_daily_amount_exceeded"
    assert await counts(db) == before
    # The refused keys were released: the corrected requests go through under them.
    assert (
        await pay(db, command("mer_grocer", 9_999_99, "i3"), clock, limits, master=MASTER)
    ).status_code == 202
    assert (
        await pay(db, command("mer_grocer", 1, "g2"), clock, limits, master=MASTER)
    ).status_code == 202


async def test_failed_payments_do_not_count_and_the_next_ist_day_starts_afresh(db):
    await merchants(db)
    clock = FakeClock(NOW)
    limits = service.PaymentLimits()
    pay = service.initiate_payment
    for key in ("j1", "j2", "j3"):
        done = await pay(db, command("mer_jeweller", 2 * LAKH, key), clock, limits, master=MASTER)
        assert done.status_code == 202
    with pytest.raises(LimitExceeded) as over:
        await pay(db, command("mer_jeweller", 1, "j4"), clock, limits, master=MASTER)
    assert over.value.limit_fields() == {"category": "jewellery", "limit_paise": 6 * LAKH}
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE payments SET status = 'FAILED' WHERE merchant_order_id = 'j1'")
        )
    done = await pay(db, command("mer_jeweller", 2 * LAKH, "j4"), clock, limits, master=MASTER)
    assert done.status_code == 202
    clock.advance((datetime(2026, 6, 1, 18, 29, 59, tzinfo=UTC) - NOW).total_seconds())
    with pytest.raises(LimitExceeded):  # 23:59:59 IST: still today
        await pay(db, command("mer_jeweller", 1, "j5"), clock, limits, master=MASTER)
    clock.advance(1)  # 00:00 IST the next day
    done = await pay(db, command("mer_jeweller", 2 * LAKH, "j5"), clock, limits, master=MASTER)
    assert done.status_code == 202


async def _waiting_for_the_payer_lock(db: Database) -> int:
    async with db.connection() as conn:
        return (
            await conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            )
        ).scalar_one()


async def test_two_concurrent_initiations_cannot_both_pass_a_category_cap(db):
    """₹5 lakh spent; two ₹5 lakh initiations at once: each fits alone, both do not. The test
    holds the payer's lock until both are waiting on it, so they really run together."""
    await merchants(db)
    clock = FakeClock(NOW)
    limits = service.PaymentLimits()
    payer = "big.payer@okhdfc"
    first = await service.initiate_payment(
        db,
        command("mer_insurer", 5 * LAKH, "c0"),
        clock,
        limits,
        master=MASTER,
    )
    assert first.status_code == 202

    async def initiate(key: str) -> str:
        try:
            await service.initiate_payment(
                db, command("mer_insurer", 5 * LAKH, key), clock, limits, master=MASTER
            )
        except LimitExceeded as refused:
            return refused.code
        return "accepted"

    async with db.transaction() as holder:
        await holder.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": "payer:" + payer_key(MASTER, payer).hex()},
        )
        racers = [asyncio.create_task(initiate(key)) for key in ("c1", "c2")]
        async with asyncio.timeout(60):
            while await _waiting_for_the_payer_lock(db) < 2:
                await asyncio.sleep(0.05)
    outcomes = sorted(await asyncio.gather(*racers))
    assert outcomes == ["accepted", "payer_category_daily_amount_exceeded"]
    async with db.connection() as conn:
        total = (
            await conn.execute(
                text("SELECT sum(amount_paise) FROM payments WHERE payer_key = :p"),
                {"p": payer_key(MASTER, payer)},
            )
        ).scalar_one()
    assert total == 10 * LAKH

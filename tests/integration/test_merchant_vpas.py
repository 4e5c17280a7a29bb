"""A merchant collects only into its registered VPAs, on the real PostgreSQL: the
registrations, the gateway's check (and what a refused payment leaves behind: nothing),
the migration that registers existing merchants, and settlement's own copy."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from api.bootstrap import all_migrations
from compliance.ledger import LedgerWriter
from core.clock import FakeClock
from core.crypto import MasterKey
from core.errors import LimitExceeded, NotFound, PayeeNotAllowed, VpaTaken
from core.events import CATALOGUE, Envelope, MerchantVpaRegistered
from core.pii import Vpa, unkeyed_partition_key
from core.storage import Database, migrate
from payments import service
from payments.merchants import Merchant, insert_merchant, register_vpa
from settlement.recorder import PAYEE_PSEUDONYM, SettlementRecorder
from tests.support import empty_database

pytestmark = pytest.mark.postgres

# Seals the payers of the payments these tests make (no engine binds one here).
MASTER = MasterKey(bytes(range(32)))

NOW = datetime(2026, 6, 1, 6, 0, tzinfo=UTC)


async def merchant(db: Database, merchant_id: str = "mer_1", vpa: str = "shop@okicici") -> None:
    async with db.transaction() as conn:
        await insert_merchant(conn, Merchant(merchant_id, "Shop", vpa, "5411", None), b"x", at=NOW)


def command(key: str, payee: str | None, amount: int = 1_000) -> service.InitiatePayment:
    body = {"payer_vpa": "success@okhdfc", "amount_paise": amount, "merchant_order_id": "o"}
    if payee is not None:
        body["payee_vpa"] = payee
    return service.InitiatePayment(
        merchant_id="mer_1",
        idempotency_key=key,
        request_hash=service.request_hash(body),
        payer_vpa=Vpa("success@okhdfc"),
        partition_key=unkeyed_partition_key("success@okhdfc"),
        payee_vpa=Vpa(payee) if payee else None,
        amount_paise=amount,
        merchant_order_id="o",
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


async def registered(db: Database) -> list[tuple[str, str]]:
    async with db.connection() as conn:
        rows = await conn.execute(text("SELECT vpa, merchant_id FROM merchant_vpas ORDER BY vpa"))
        return [tuple(r) for r in rows.all()]  # type: ignore[misc]


async def registration_events(db: Database) -> list[Envelope]:
    async with db.connection() as conn:
        rows = await conn.execute(
            text(
                "SELECT envelope FROM outbox WHERE event_type = 'MerchantVpaRegistered' ORDER BY id"
            )
        )
        return [Envelope.from_bytes(bytes(raw)) for raw in rows.scalars()]


async def test_a_merchant_has_its_own_vpa_and_those_added_and_one_vpa_has_one_merchant(db):
    await merchant(db)
    await merchant(db, "mer_2", "other@ybl")
    async with db.transaction() as conn:
        assert await register_vpa(conn, "mer_1", Vpa("Shop.Counter2@OKICICI")) is True
    async with db.transaction() as conn:  # again: nothing changes, nothing is published
        assert await register_vpa(conn, "mer_1", Vpa("shop.counter2@okicici")) is False
    with pytest.raises(VpaTaken):
        async with db.transaction() as conn:
            await register_vpa(conn, "mer_1", Vpa("other@ybl"))
    with pytest.raises(NotFound):
        async with db.transaction() as conn:
            await register_vpa(conn, "mer_nobody", Vpa("new@ybl"))
    with pytest.raises(VpaTaken):  # a new merchant cannot take another merchant's VPA either
        await merchant(db, "mer_3", "shop@okicici")
    assert await registered(db) == [
        ("other@ybl", "mer_2"),
        ("shop.counter2@okicici", "mer_1"),
        ("shop@okicici", "mer_1"),
    ]
    events = [CATALOGUE.decode(e) for e in await registration_events(db)]
    assert [(e.merchant_id, e.vpa.value) for e in events] == [  # type: ignore[attr-defined]
        ("mer_1", "shop@okicici"),
        ("mer_2", "other@ybl"),
        ("mer_1", "shop.counter2@okicici"),
    ]
    async with db.connection() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM merchants"))).scalar_one() == 2


async def test_a_foreign_payee_is_refused_leaves_nothing_and_the_key_can_be_reused(db):
    await merchant(db)
    await merchant(db, "mer_2", "other@ybl")
    clock = FakeClock(NOW)
    before = await counts(db)
    for payee in ("thief@okaxis", "other@ybl"):  # nobody's, and another merchant's
        with pytest.raises(PayeeNotAllowed) as refused:
            await service.initiate_payment(db, command("k1", payee), clock, master=MASTER)
        assert refused.value.code == "payee_not_allowed"
        assert "@" in str(refused.value) and payee not in str(refused.value)  # masked
    assert await counts(db) == before, "a refused payment left a payment, an event or a key"

    # The same key with the corrected body goes through, like after amount_over_limit.
    with pytest.raises(LimitExceeded):
        await service.initiate_payment(
            db, command("k2", None, amount=10_000_001), clock, master=MASTER
        )
    ok = await service.initiate_payment(db, command("k1", None), clock, master=MASTER)
    assert ok.status_code == 202 and not ok.replayed
    fixed = await service.initiate_payment(db, command("k2", "shop@okicici"), clock, master=MASTER)
    assert fixed.status_code == 202 and not fixed.replayed

    async with db.transaction() as conn:
        await register_vpa(conn, "mer_1", Vpa("shop.counter2@okicici"))
    added = await service.initiate_payment(
        db, command("k3", "shop.counter2@okicici"), clock, master=MASTER
    )
    assert added.status_code == 202
    async with db.connection() as conn:
        payees = (
            await conn.execute(
                text("SELECT payee_vpa FROM payments ORDER BY created_at, payee_vpa")
            )
        ).scalars()
        assert sorted(payees) == ["shop.counter2@okicici", "shop@okicici", "shop@okicici"]


async def test_the_migration_registers_existing_merchants_and_tells_settlement(pg_server):
    """A database from before merchant_vpas: each merchant's own VPA is registered (the
    first merchant keeps a VPA two of them shared) and published for settlement's copy."""
    db = await empty_database(pg_server, "m")
    try:
        migrations = all_migrations()
        cut = next(i for i, m in enumerate(migrations) if m.id == "payments.0008_merchant_vpas")
        await migrate(db, migrations[:cut])
        async with db.transaction() as conn:
            for merchant_id, vpa, created in (
                ("mer_old", "Shop@OKICICI", datetime(2026, 1, 1, tzinfo=UTC)),
                ("mer_twin", "shop@okicici", datetime(2026, 2, 1, tzinfo=UTC)),
                ("mer_tea", "tea@oksbi", datetime(2026, 3, 1, tzinfo=UTC)),
            ):
                await conn.execute(
                    text(
                        "INSERT INTO merchants (merchant_id, name, vpa, mcc, webhook_secret_enc,"
                        " created_at) VALUES (:m, 'S', :v, '5411', 'x', :at)"
                    ),
                    {"m": merchant_id, "v": vpa, "at": created},
                )
        await migrate(db, migrations)
        assert await registered(db) == [("shop@okicici", "mer_old"), ("tea@oksbi", "mer_tea")]
        envelopes = await registration_events(db)
        events = [CATALOGUE.decode_as(e, MerchantVpaRegistered) for e in envelopes]
        assert [(e.merchant_id, e.vpa.value) for e in events] == [
            ("mer_old", "shop@okicici"),
            ("mer_tea", "tea@oksbi"),
        ]
        assert events[0].registered_at == datetime(2026, 1, 1, tzinfo=UTC)
        assert {e.partition_key for e in envelopes} == {"merchant:mer_old", "merchant:mer_tea"}

        key = MasterKey(os.urandom(32))
        # The ledger takes them like any event (they are in the audit trail too).
        assert await LedgerWriter(db, key, FakeClock(NOW)).append(envelopes) == 2
        recorder = SettlementRecorder(db, key)
        await recorder.record(envelopes)
        await recorder.record(envelopes)  # a redelivery changes nothing
        async with db.connection() as conn:
            copy = (
                await conn.execute(
                    text("SELECT vpa_key, merchant_id FROM settlement_merchant_vpas")
                )
            ).all()
        assert {(bytes(k), m) for k, m in copy} == {
            (key.pseudonym("shop@okicici", PAYEE_PSEUDONYM), "mer_old"),
            (key.pseudonym("tea@oksbi", PAYEE_PSEUDONYM), "mer_tea"),
        }
    finally:
        await db.close()

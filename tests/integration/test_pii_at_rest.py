"""The payer's PII at rest in operational tables (SPEC §1, issue 20), on the real
PostgreSQL: sealed in the payments row and in the outbox, found by keyed pseudonym; rows
from before sealing are sealed when the engine starts; the retention purge empties what is
past its period, and keeps what a refund, a dispute or a late success still needs."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from api.bootstrap import all_migrations
from core.clock import FakeClock
from core.crypto import MasterKey, SealedPiiError
from core.errors import IdempotencyConflict, RefundRejected
from core.events import CATALOGUE, DeviceInfo, Envelope, PaymentInitiated
from core.pii import Vpa
from core.sealing import open_envelope
from core.storage import Database, migrate
from fraud.store import place_aad, seal_clear_places
from payments import refunds, repository, service
from payments.merchants import Merchant, insert_merchant
from payments.retention import PiiPurger, seal_clear_payers
from tests.support import empty_database

pytestmark = pytest.mark.postgres

MASTER = MasterKey(bytes(range(32)))
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
PAYER = "keerthana.menon.8830@okaxis"
DEVICE = DeviceInfo(id="dev-rest-5521", ip="198.51.100.61", latitude=9.931233, longitude=76.267303)
CLEAR = (PAYER, "keerthana", "dev-rest-5521", "198.51.100.61", "9.931233", "76.267303")


def command(key: str, payer: str = PAYER, device: DeviceInfo | None = DEVICE):
    return service.InitiatePayment(
        merchant_id="mer_1",
        idempotency_key=key,
        request_hash=key.encode(),
        payer_vpa=Vpa(payer),
        partition_key=MASTER.partition_key(payer),
        payee_vpa=None,
        amount_paise=1_000,
        merchant_order_id=f"o-{key}",
        device=device,
    )


def in_clear(raw: bytes) -> list[str]:
    return [s for s in CLEAR if s.encode() in raw]


async def merchant(db: Database) -> None:
    async with db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")


async def pay(db: Database, key: str, payer: str = PAYER) -> str:
    done = await service.initiate_payment(db, command(key, payer), FakeClock(NOW), master=MASTER)
    return str(done.body["transaction_id"])


async def test_a_payment_row_and_its_event_hold_the_payer_sealed(db):
    await merchant(db)
    txn, other = await pay(db, "k1"), await pay(db, "k2", "someone.else@ybl")
    async with db.connection() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT payer_vpa, device, payer_key, payer_pii, payee_vpa FROM payments"
                    " WHERE transaction_id = :t"
                ),
                {"t": txn},
            )
        ).one()
        raw = (
            await conn.execute(
                text("SELECT envelope FROM outbox WHERE event_type = 'PaymentInitiated'")
            )
        ).scalars()
        outbox = [bytes(r) for r in raw]
        payment = await repository.load_payment(conn, txn, MASTER)
    assert row.payer_vpa is None and row.device is None
    assert in_clear(bytes(row.payer_pii)) == []
    assert bytes(row.payer_key) == repository.payer_key(MASTER, PAYER)
    assert row.payee_vpa == "shop@okicici"
    assert payment is not None and payment.payer_vpa == PAYER
    assert PAYER not in repr(payment)
    assert len(outbox) == 2 and all(in_clear(r) == [] for r in outbox)
    event = CATALOGUE.decode(open_envelope(Envelope.from_bytes(outbox[0]), MASTER))
    assert isinstance(event, PaymentInitiated) and event.device == DEVICE
    # Sealed to its row: a payer moved onto another payment does not open there.
    async with db.transaction() as conn:
        await conn.execute(
            text(
                "UPDATE payments SET payer_pii = (SELECT payer_pii FROM payments"
                " WHERE transaction_id = :t) WHERE transaction_id = :o"
            ),
            {"t": txn, "o": other},
        )
    async with db.connection() as conn:
        with pytest.raises(SealedPiiError):
            await repository.load_payment(conn, other, MASTER)


async def test_rows_from_before_sealing_are_sealed_when_the_engine_starts(pg_server):
    db = await empty_database(pg_server, "pii")
    try:
        new = {"payments.0017_sealed_payers", "fraud.0004_sealed_places"}
        migrations = all_migrations()
        await migrate(db, [m for m in migrations if m.id not in new])
        async with db.transaction() as conn:
            await conn.execute(
                text(
                    "INSERT INTO merchants (merchant_id, name, vpa, mcc, webhook_secret_enc)"
                    " VALUES ('mer_1', 'S', 'shop@okicici', '5411', 'x')"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO payments (transaction_id, merchant_id, merchant_order_id,"
                    " payer_vpa, payee_vpa, amount_paise, currency, mcc, status, created_at,"
                    " updated_at, partition_key, device) VALUES ('UPI1', 'mer_1', 'o', :p,"
                    " 'shop@okicici', 100, 'INR', '5411', 'INITIATED', :at, :at, 'k',"
                    " CAST(:d AS jsonb))"
                ),
                {"p": PAYER.upper(), "at": NOW, "d": DEVICE.model_dump_json()},
            )
            await conn.execute(
                text(
                    "INSERT INTO fraud_observations (transaction_id, payer_key, payee_key,"
                    " amount_paise, at, lat, lon) VALUES ('UPI1', 'p', 'q', 100, :at, :lat, :lon)"
                ),
                {"at": NOW, "lat": DEVICE.latitude, "lon": DEVICE.longitude},
            )
            await conn.execute(  # half a place: no point to seal
                text(
                    "INSERT INTO fraud_observations (transaction_id, payer_key, payee_key,"
                    " amount_paise, at, lat) VALUES ('UPI2', 'p', 'q', 100, :at, 12.5)"
                ),
                {"at": NOW},
            )
        await migrate(db, migrations)
        assert await seal_clear_payers(db, MASTER, batch=1) == 1
        assert await seal_clear_payers(db, MASTER) == 0  # once
        assert await seal_clear_places(db, MASTER) == 1
        async with db.connection() as conn:
            row = (await conn.execute(text("SELECT * FROM payments"))).one()
            obs, half = (
                await conn.execute(text("SELECT * FROM fraud_observations ORDER BY id"))
            ).all()
            payment = await repository.load_payment(conn, "UPI1", MASTER)
        assert row.payer_vpa is None and row.device is None
        assert bytes(row.payer_key) == repository.payer_key(MASTER, PAYER)
        assert payment is not None and payment.payer_vpa == PAYER
        opened = MASTER.open_pii(bytes(row.payer_pii), repository.payer_aad("UPI1"))
        assert opened["device"]["id"] == "dev-rest-5521"
        assert obs.lat is None and obs.lon is None and obs.cell_key is not None
        place = MASTER.open_pii(bytes(obs.place_pii), place_aad("UPI1"))
        assert place == [DEVICE.latitude, DEVICE.longitude]
        assert half.lat is None and half.place_pii is None and half.cell_key is None
    finally:
        await db.close()


async def test_the_retention_purge_empties_what_no_one_needs_any_more(db):
    await merchant(db)
    done, young, disputed, refunding = [await pay(db, f"k{n}") for n in range(4)]
    old = NOW - timedelta(days=401)
    async with db.transaction() as conn:
        for txn, at in ((done, old), (young, NOW - timedelta(days=399))):
            await conn.execute(
                text(
                    "UPDATE payments SET status = 'SUCCESS', completed_at = :at"
                    " WHERE transaction_id = :t"
                ),
                {"t": txn, "at": at},
            )
        for txn in (disputed, refunding):
            await conn.execute(
                text(
                    "UPDATE payments SET status = 'SUCCESS', completed_at = :at"
                    " WHERE transaction_id = :t"
                ),
                {"t": txn, "at": old},
            )
        await conn.execute(
            text(
                "INSERT INTO disputes (dispute_id, transaction_id, merchant_id, amount_paise,"
                " reason, status, raised_at, respond_by, payer_bank, payee_bank, created_at,"
                " updated_at) VALUES ('D1', :t, 'mer_1', 100, 'not received', 'OPEN', :at,"
                " :at, 'AXIS', 'ICICI', :at, :at)"
            ),
            {"t": disputed, "at": NOW},
        )
        await conn.execute(
            text(
                "INSERT INTO refunds (refund_id, transaction_id, merchant_id, amount_paise,"
                " status, created_at) VALUES ('R1', :t, 'mer_1', 10, 'PENDING', :at)"
            ),
            {"t": refunding, "at": NOW},
        )
    purger = PiiPurger(db, FakeClock(NOW), timedelta(days=400), batch=1)
    assert await purger.purge_due() == 1
    assert await purger.purge_due() == 0
    async with db.connection() as conn:
        rows = {
            r.transaction_id: r
            for r in await conn.execute(
                text("SELECT transaction_id, payer_pii, payer_key, pii_purged_at FROM payments")
            )
        }
        purged = await repository.load_payment(conn, done, MASTER)
    assert rows[done].payer_pii is None and rows[done].payer_key is None
    assert rows[done].pii_purged_at == NOW
    for kept in (young, disputed, refunding):
        assert rows[kept].payer_pii is not None and rows[kept].pii_purged_at is None
    assert purged is not None and purged.payer_vpa == ""
    with pytest.raises(RefundRejected, match="purged"):
        await refunds.request_refund(
            db,
            merchant_id="mer_1",
            transaction_id=done,
            amount_paise=10,
            idempotency_key="r1",
            request_hash=b"h",
            clock=FakeClock(NOW),
            master=MASTER,
        )


async def test_the_idempotency_row_keeps_the_request_hash_keyed(db):
    """A plain hash of a body with the payer's VPA in it would give the VPA away to anyone
    with a list of candidates: the row holds it keyed; a row from before (plain) still
    matches its resend."""
    await merchant(db)
    cmd = command("k1")
    first = await service.initiate_payment(db, cmd, FakeClock(NOW), master=MASTER)
    async with db.connection() as conn:
        stored = (
            await conn.execute(text("SELECT request_hash FROM idempotency_keys"))
        ).scalar_one()
    assert bytes(stored) != cmd.request_hash and len(bytes(stored)) == 32
    again = await service.initiate_payment(db, cmd, FakeClock(NOW), master=MASTER)
    assert again.replayed and again.body == first.body
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE idempotency_keys SET request_hash = :h"), {"h": cmd.request_hash}
        )
    legacy = await service.initiate_payment(db, cmd, FakeClock(NOW), master=MASTER)
    assert legacy.replayed and legacy.body == first.body
    changed = dataclasses.replace(cmd, request_hash=b"another body")
    with pytest.raises(IdempotencyConflict):
        await service.initiate_payment(db, changed, FakeClock(NOW), master=MASTER)

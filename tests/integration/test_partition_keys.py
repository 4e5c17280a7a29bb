"""The bus partition key of a payment's events is the payer's keyed pseudonym (issue 20),
on the real PostgreSQL: through the gateway, every event of a payment (the switch's and the
fraud verdict's included) carries one key, the same for a payer's payments, different
between payers, and neither the VPA nor its plain hash; payments from before the keyed key
keep the one they were published under."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text

from api.auth import Role, issue_token
from api.bootstrap import Engine, all_migrations
from api.http import create_app
from core.crypto import MasterKey
from core.events import Envelope
from core.pii import unkeyed_partition_key
from core.storage import migrate
from payments import service
from payments.merchants import Merchant, insert_merchant
from tests.support import empty_database, running_engine

pytestmark = pytest.mark.postgres


@pytest.fixture
async def engine(db_url) -> AsyncIterator[Engine]:
    async with running_engine(
        db_url, fraud_step_up_threshold=1.0, fraud_block_threshold=1.0
    ) as eng:
        yield eng


async def test_a_payments_events_carry_the_payers_keyed_pseudonym(engine):
    async with engine.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
        key = await issue_token(
            conn, principal_id="p_mer_1", role=Role.MERCHANT, name="shop", merchant_id="mer_1"
        )
    payers = ["success@okhdfc", "success@okhdfc", "success@oksbi"]
    app = create_app(engine, manage_engine=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine"
    ) as client:
        txns = []
        for n, payer in enumerate(payers):
            r = await client.post(
                "/v1/payments",
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": f"k{n}"},
                json={"payer_vpa": payer, "amount_paise": 1000 + n, "merchant_order_id": f"o{n}"},
            )
            assert r.status_code == 202, r.text
            txns.append(r.json()["transaction_id"])
    for txn in txns:
        deadline = asyncio.get_running_loop().time() + 20
        while not (
            await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        ).status.is_final:
            assert asyncio.get_running_loop().time() < deadline, txn
            await asyncio.sleep(0.02)

    async with engine.db.connection() as conn:
        outbox = (
            await conn.execute(
                text(
                    "SELECT envelope, partition_key FROM outbox"
                    " WHERE topic IN ('payments', 'fraud')"
                )
            )
        ).all()
        stored = dict(
            (await conn.execute(text("SELECT transaction_id, partition_key FROM payments"))).all()
        )
    rows = []
    for raw, partition_key in outbox:
        envelope = Envelope.from_bytes(bytes(raw))
        assert envelope.partition_key == partition_key
        if "transaction_id" not in envelope.payload:
            continue  # a merchant's events (MerchantVpaRegistered): keyed by the merchant
        rows.append((envelope.payload["transaction_id"], partition_key, envelope.event_type))
    keys: dict[str, set[str]] = {}
    for txn, partition_key, _ in rows:
        keys.setdefault(txn, set()).add(partition_key)
    kinds = {event_type for t, _, event_type in rows if t == txns[0]}
    assert {"PaymentInitiated", "FraudAssessed", "PaymentSucceeded"} <= kinds, kinds
    assert all(len(keys[t]) == 1 for t in txns), keys
    first, again, other = (keys[t].pop() for t in txns)
    assert first == again == stored[txns[0]] == stored[txns[1]]  # one payer: one partition
    assert other != first
    assert first == engine.master_key.partition_key("success@okhdfc")
    for payer, partition_key in (("success@okhdfc", first), ("success@oksbi", other)):
        assert partition_key != unkeyed_partition_key(payer)
        assert payer not in partition_key and len(partition_key) == 32
    # Another master key (another deployment) gives another key for the same payer.
    assert MasterKey(os.urandom(32)).partition_key("success@okhdfc") != first


async def test_payments_from_before_the_migration_keep_the_key_they_were_published_under(
    pg_server,
):
    db = await empty_database(pg_server, "pk")
    try:
        migrations = all_migrations()
        cut = next(i for i, m in enumerate(migrations) if m.id == "payments.0016_partition_keys")
        await migrate(db, migrations[:cut])
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
                    " updated_at) VALUES ('UPI1', 'mer_1', 'o', 'Ravi.K@OKAXIS', 'shop@okicici',"
                    " 100, 'INR', '5411', 'PENDING', now(), now())"
                )
            )
        await migrate(db, migrations)
        async with db.connection() as conn:
            key = (await conn.execute(text("SELECT partition_key FROM payments"))).scalar_one()
        assert key == unkeyed_partition_key("ravi.k@okaxis")
    finally:
        await db.close()

"""Rotating the master key (issue 20, part 3; PCI DSS 3.6/3.7) on the real PostgreSQL: every
sealed value (data keys, signing keys, webhook secrets, dispute evidence, the pseudonym key)
opens under the new key and under the old one no longer; pseudonyms stay the same; the
database refuses the old key afterwards; a value that does not open stops the rotation
with nothing changed."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import text

from api.bootstrap import Engine, bind_database_master_key, sealed_columns
from core.crypto import MasterKey
from core.keyring import CORE_SEALED, WrongMasterKey, bind_master_key, rotate_master_key
from payments import disputes, repository
from payments.domain import PaymentStatus
from tests.integration.test_disputes import DISPUTES, disputed_payment, wait_for
from tests.integration.test_npci import final, pay, start_engine

pytestmark = pytest.mark.postgres


async def sealed_values(engine: Engine) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every sealed value with its AAD, by column."""
    found: dict[str, list[tuple[bytes, bytes]]] = {}
    async with engine.db.connection() as conn:
        for col in [*CORE_SEALED, *sealed_columns()]:
            rows = await conn.execute(
                text(
                    f"SELECT {col.aad_column}::text AS a, {col.column} AS v FROM {col.table}"
                    f" WHERE {col.column} IS NOT NULL"
                )
            )
            found[f"{col.table}.{col.column}"] = [(bytes(r.v), col.aad(r.a)) for r in rows]
    return found


async def ledger_size(engine: Engine) -> int:
    async with engine.db.connection() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM ledger_entries"))).scalar_one())


def raw_key_of(engine: Engine) -> MasterKey:
    """The configured master key, loaded afresh (its own pseudonym key, not the bound one)."""
    assert engine.settings.master_key
    return MasterKey(base64.b64decode(engine.settings.master_key))


async def test_every_sealed_value_moves_to_the_new_key_and_nothing_opens_under_the_old(db_url):
    engine = await start_engine(db_url, **DISPUTES)
    old = engine.master_key
    try:
        # A real secret for the merchant (start_engine's is a placeholder), a second one as
        # a rotation leaves it, evidence for a contested dispute, ledger keys in use.
        secret = old.seal(b"whsec-one", b"mer_1")
        async with engine.db.transaction() as conn:
            await conn.execute(
                text("UPDATE merchants SET webhook_secret_enc = :s WHERE merchant_id = 'mer_1'"),
                {"s": secret},
            )
            await conn.execute(
                text("UPDATE webhook_secrets SET secret_enc = :s WHERE merchant_id = 'mer_1'"),
                {"s": secret},
            )
        _, dispute_id = await disputed_payment(engine, "dispute@oksbi", 3_000)
        await disputes.contest_dispute(
            engine.db,
            old,
            "mer_1",
            dispute_id,
            evidence="Delivered on 2 Dec.",
            documents=["invoice"],
            clock=engine.clock,
        )
        txn = await pay(engine, "ravi@okaxis", 2_500)
        assert (await final(engine, txn)).status is PaymentStatus.SUCCESS
        assert engine.ledger is not None
        await wait_for(lambda: ledger_size(engine))
        await engine.ledger.checkpoint_if_due(force=True)
        pseudonym = old.pseudonym("ravi@okaxis", "payer")
    finally:
        await engine.stop()

    before = await sealed_values(engine)
    assert all(before[c] for c in before), {c: len(v) for c, v in before.items()}
    # Every column named as sealed in the schema is one the rotation knows.
    async with engine.db.connection() as conn:
        named = await conn.execute(
            text(
                "SELECT table_name || '.' || column_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND data_type = 'bytea' AND (column_name"
                " LIKE '%\\_enc' OR column_name LIKE 'wrapped%' OR column_name LIKE '%sealed')"
            )
        )
        assert set(named.scalars()) == set(before)
    new_raw = os.urandom(32)
    new = MasterKey(new_raw)
    async with engine.db.transaction() as conn:
        done = await rotate_master_key(conn, old, new, sealed_columns())
    assert {r.column: r.values for r in done} == {c: len(v) for c, v in before.items()}

    after = await sealed_values(engine)
    for column, values in after.items():
        assert len(values) == len(before[column]), column
        for sealed, aad in values:
            with pytest.raises(InvalidTag):
                old.open(sealed, aad)
            new.open(sealed, aad)  # opens
        assert sorted(new.open(s, a) for s, a in values) == sorted(
            old.open(s, a) for s, a in before[column]
        ), column
    # Pseudonyms (fraud history, payee lookups) are the same under the new key.
    fresh = MasterKey(new_raw)
    async with engine.db.transaction() as conn:
        await bind_master_key(conn, fresh)
        with pytest.raises(WrongMasterKey, match="not the database's master key"):
            await bind_master_key(conn, raw_key_of(engine))
    assert fresh.pseudonym("ravi@okaxis", "payer") == pseudonym
    # So is the PII field key: a payer sealed before the rotation opens after it.
    assert fresh.field_key_id == old.field_key_id
    async with engine.db.connection() as conn:
        payment = await repository.load_payment(conn, txn, fresh)
    assert payment is not None and payment.payer_vpa == "ravi@okaxis"
    await engine.db.close()


async def test_a_value_that_does_not_open_stops_the_rotation_with_nothing_changed(db_url):
    engine = await start_engine(db_url)  # its merchant's secret is a placeholder, b"x"
    old = engine.master_key
    await engine.stop()
    before = await sealed_values(engine)
    with pytest.raises(WrongMasterKey, match=r"merchants\.webhook_secret_enc mer_1"):
        async with engine.db.transaction() as conn:
            await rotate_master_key(conn, old, MasterKey(os.urandom(32)), sealed_columns())
    assert await sealed_values(engine) == before
    # The engine binds the same key again afterwards.
    await bind_database_master_key(engine.db, old, engine.settings)
    await engine.db.close()

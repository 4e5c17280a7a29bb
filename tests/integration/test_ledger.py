"""The compliance ledger on the real PostgreSQL: appends, redelivery, concurrent writers,
checkpoints, tampering in the database, resumable verification, key rotation and
crypto-shredding, and no PII in clear."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from compliance import chain, keys, ledger
from compliance.ledger import (
    LedgerWriter,
    export_lines,
    ledger_page,
    transaction_audit,
    verify_ledger,
)
from core.clock import FakeClock
from core.crypto import MasterKey
from core.events import Envelope, PaymentInitiated
from tests import ledger_verifier

pytestmark = pytest.mark.postgres

MASTER = MasterKey(os.urandom(32))
PAYER = "rahul.sharma@okhdfc"


def envelopes(n: int, start: int = 0) -> list[Envelope]:
    out = []
    for i in range(start, start + n):
        event = PaymentInitiated(
            transaction_id=f"UPI{i:06d}",
            merchant_id="m",
            merchant_order_id=str(i),
            payer_vpa=PAYER,
            payee_vpa="shop@okicici",
            amount_paise=100 + i,
            initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        out.append(Envelope.wrap(event, partition_key="k"))
    return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 3, 1, tzinfo=UTC))


@pytest.fixture
def writer(db, clock) -> LedgerWriter:
    return LedgerWriter(db, MASTER, clock)


async def export(db) -> list[dict]:
    return [line async for line in export_lines(db)]


async def pem(db) -> bytes:
    async with db.connection() as conn:
        row = (await conn.execute(text("SELECT public_pem FROM ledger_signing_keys"))).scalar_one()
    return row.encode()


async def test_appends_checkpoints_and_an_export_the_independent_verifier_accepts(
    db, writer, clock, tmp_path: Path
):
    batch = envelopes(2_500)
    for i in range(0, 2_500, 500):
        assert await writer.append(batch[i : i + 500]) == 500
    clock.advance(11)
    cp = await writer.checkpoint_if_due()
    assert cp is not None and cp.height == 2_500
    async with db.connection() as conn:
        heights = list(
            (
                await conn.execute(text("SELECT height FROM ledger_checkpoints ORDER BY height"))
            ).scalars()
        )
    assert heights == [1_000, 2_000, 2_500]
    result = await verify_ledger(db, clock, full=True)
    assert result.valid and result.entries == 2_500 and result.checkpoints == 3

    lines = await export(db)
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    assert ledger_verifier.verify_file(path, await pem(db)) == (True, None, "ok")


async def test_redelivery_and_concurrent_writers_keep_one_contiguous_chain(db, writer, clock):
    first = envelopes(300)
    assert await writer.append(first) == 300
    assert await writer.append(first[100:200]) == 0  # redelivered: lands nowhere
    other = LedgerWriter(db, MASTER, clock)
    a, b = envelopes(400, 1_000), envelopes(400, 2_000)
    added = await asyncio.gather(
        *(
            w.append(part)
            for w, part in [
                (writer, a[:200]),
                (other, b[:200]),
                (writer, a[200:]),
                (other, b[200:]),
                (other, a),
            ]
        )
    )
    assert sum(added) == 800
    await writer.checkpoint_if_due(force=True)
    result = await verify_ledger(db, clock, full=True)
    assert result.valid and result.entries == 1_100


async def tamper(db, sql: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(text(sql))


@pytest.mark.parametrize(
    ("what", "sql", "bad_height"),
    [
        (
            "a ciphertext byte",
            "UPDATE ledger_entries SET ciphertext = set_byte(ciphertext, 3,"
            " get_byte(ciphertext, 3) # 1) WHERE height = 42",
            42,
        ),
        (
            "a nonce byte",
            "UPDATE ledger_entries SET nonce = set_byte(nonce, 0, get_byte(nonce, 0)"
            " # 1) WHERE height = 42",
            42,
        ),
        (
            "the event type",
            "UPDATE ledger_entries SET event_type = 'PaymentFailed' WHERE height = 42",
            42,
        ),
        (
            "the transaction id",
            "UPDATE ledger_entries SET transaction_id = 'UPI999' WHERE height = 42",
            42,
        ),
        (
            "the recorded time",
            "UPDATE ledger_entries SET recorded_at = '2020-01-01T00:00:00Z' WHERE height = 42",
            42,
        ),
        ("the key id", "UPDATE ledger_entries SET key_id = 'dk-other' WHERE height = 42", 42),
        (
            "a stored hash",
            "UPDATE ledger_entries SET entry_hash = set_byte(entry_hash, 0,"
            " get_byte(entry_hash, 0) # 1) WHERE height = 42",
            42,
        ),
        (
            "a prev hash one byte longer",
            "UPDATE ledger_entries SET prev_hash = prev_hash || '\\x00'::bytea WHERE height = 42",
            42,
        ),
        (
            "a stored hash one byte shorter",
            "UPDATE ledger_entries SET entry_hash = substr(entry_hash, 1, 31) WHERE height = 42",
            42,
        ),
        (
            "the event id",
            "UPDATE ledger_entries SET event_id = gen_random_uuid() WHERE height = 42",
            42,
        ),
        ("a deleted entry", "DELETE FROM ledger_entries WHERE height = 42", 42),
        ("the last entries deleted", "DELETE FROM ledger_entries WHERE height >= 140", 140),
        (
            "two swapped entries",
            "UPDATE ledger_entries SET height = -1 WHERE height = 42;"
            " UPDATE ledger_entries SET height = 42 WHERE height = 43;"
            " UPDATE ledger_entries SET height = 43 WHERE height = -1",
            42,
        ),
        (
            "an altered checkpoint root",
            "UPDATE ledger_checkpoints SET merkle_root ="
            " set_byte(merkle_root, 0, get_byte(merkle_root, 0) # 1) WHERE height = 100",
            99,
        ),
        (
            "an altered checkpoint signature",
            "UPDATE ledger_checkpoints SET signature ="
            " set_byte(signature, 0, get_byte(signature, 0) # 1) WHERE height = 100",
            99,
        ),
    ],
)
async def test_tampering_in_the_database_is_found_at_its_height(
    db, writer, clock, what, sql, bad_height, monkeypatch
):
    # Small pages: the verifier reads the chain as many COPYs on two connections, and the
    # faults fall inside pages, not on their edges.
    monkeypatch.setattr(ledger, "_VERIFY_PAGE", 5)
    await writer.append(envelopes(100))
    await writer.checkpoint_if_due(force=True)
    await writer.append(envelopes(50, 500))
    await writer.checkpoint_if_due(force=True)
    assert (await verify_ledger(db, clock, full=True)).valid
    for statement in sql.split(";"):
        await tamper(db, statement)
    result = await verify_ledger(db, clock, full=True)
    assert not result.valid, what
    assert result.first_bad_height == bad_height, (what, result)
    # The export shows the same fault to an outside auditor.
    ok, height, _ = ledger_verifier.verify(await export(db), chain_key(await pem(db)))
    assert not ok and height == bad_height, what


def chain_key(pem_bytes: bytes):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(pem_bytes)


async def test_verification_resumes_from_the_last_verified_checkpoint(db, writer, clock):
    await writer.append(envelopes(200))
    await writer.checkpoint_if_due(force=True)
    assert (await verify_ledger(db, clock, full=True)).entries == 200
    await writer.append(envelopes(30, 900))
    await writer.checkpoint_if_due(force=True)
    resumed = await verify_ledger(db, clock)
    assert resumed.valid and resumed.entries == 30  # only what is new
    await tamper(db, "UPDATE ledger_entries SET event_type = 'X' WHERE height = 5")
    assert (await verify_ledger(db, clock)).valid  # before the resume point: not rechecked
    full = await verify_ledger(db, clock, full=True)
    assert not full.valid and full.first_bad_height == 5


async def test_rotation_keeps_old_entries_readable_and_shredding_keeps_the_chain(db, writer, clock):
    await writer.append(envelopes(3))
    async with db.transaction() as conn:
        old = (await conn.execute(text("SELECT key_id FROM ledger_keys WHERE active"))).scalar_one()
        clock.advance(60)
        new = await keys.rotate_data_key(conn, MASTER, clock.now())
    await writer.append(envelopes(3, 10))
    first = await transaction_audit(db, MASTER, "UPI000001")
    later = await transaction_audit(db, MASTER, "UPI000011")
    assert first["events"][0]["entry"]["key_id"] == old
    assert later["events"][0]["entry"]["key_id"] == new.key_id
    assert first["events"][0]["event"]["payload"]["payer_vpa"] == PAYER
    assert later["events"][0]["event"]["payload"]["amount_paise"] == 111

    clock.advance(7 * 366 * 86_400)  # seven years on
    async with db.transaction() as conn:
        destroyed = await keys.shred_data_keys(conn, clock.now())
    assert destroyed == [old]  # the active key is never shredded
    gone = await transaction_audit(db, MASTER, "UPI000001")
    assert gone["events"][0]["event"] is None
    assert "crypto-shredded" in gone["events"][0]["unreadable"]
    assert (await transaction_audit(db, MASTER, "UPI000011"))["events"][0]["event"] is not None
    await writer.checkpoint_if_due(force=True)
    assert (await verify_ledger(db, clock, full=True)).valid


async def test_inclusion_proofs_verify_against_the_signed_root(db, writer, clock):
    await writer.append(envelopes(37))
    cp = await writer.checkpoint_if_due(force=True)
    assert cp is not None
    audit = await transaction_audit(db, MASTER, "UPI000020")
    [item] = audit["events"]
    proof = item["inclusion_proof"]
    assert (proof["leaf_index"], proof["tree_size"]) == (20, 37)
    assert chain.verify_inclusion(
        proof["leaf_index"],
        proof["tree_size"],
        bytes.fromhex(item["entry"]["entry_hash"]),
        [bytes.fromhex(p) for p in proof["audit_path"]],
        cp.merkle_root,
    )
    page = await ledger_page(db, 30, 10)
    assert page[0] == {"type": "header", "format": 2, "from_height": 30, "v2_from_height": 0}
    page = page[1:]
    assert [line["height"] for line in page] == [30, 31, 32, 33, 34, 35, 36, 37]
    assert page[-1]["type"] == "checkpoint"


async def test_no_pii_in_clear_in_any_ledger_table(db, writer):
    await writer.append(envelopes(20))
    await writer.checkpoint_if_due(force=True)
    async with db.connection() as conn:
        for table in (
            "ledger_entries",
            "ledger_checkpoints",
            "ledger_keys",
            "ledger_state",
            "ledger_signing_keys",
            "ledger_tiles",
        ):
            dump = (
                await conn.execute(text(f"SELECT string_agg(t::text, '|') FROM {table} t"))
            ).scalar_one()
            assert PAYER not in (dump or ""), table
            assert "rahul" not in (dump or ""), table
            hexed = PAYER.encode().hex()
            assert hexed not in (dump or ""), table


async def test_verification_raises_when_the_database_fails_midway(db, writer, clock, monkeypatch):
    # Pages of 5 on two connections; every page from height 10 on fails in the database
    # (division by zero), while earlier pages are being checked: the error comes out, and
    # verification neither hangs nor says anything about validity.
    await writer.append(envelopes(40))
    await writer.checkpoint_if_due(force=True)
    monkeypatch.setattr(ledger, "_VERIFY_PAGE", 5)
    failing = ledger._HASH_INPUTS.replace(
        "ORDER BY height", "AND 1.0 / (10 - LEAST({first}, 10)) > 0 ORDER BY height"
    )
    monkeypatch.setattr(ledger, "_HASH_INPUTS", failing)
    verifying = asyncio.create_task(verify_ledger(db, clock, full=True))
    done, _ = await asyncio.wait({verifying}, timeout=30)  # a hang, not a speed limit
    if not done:
        verifying.cancel()
    assert done, "verification hung after the database failed"
    with pytest.raises(Exception, match="division by zero"):
        verifying.result()
    monkeypatch.undo()
    assert (await verify_ledger(db, clock, full=True)).valid  # the connections still work


async def test_the_writer_starts_a_new_data_key_by_count_and_by_age(db, clock):
    """Issue 20, part 3: data keys rotate on their own, past a count and past an age."""
    policy = keys.DataKeyPolicy(max_age=timedelta(days=1), max_entries=5)
    writer = LedgerWriter(db, MASTER, clock, policy)
    await writer.append(envelopes(3))  # a first key: 3
    await writer.append(envelopes(2, 10))  # the same key: 5, its most
    await writer.append(envelopes(1, 20))  # a second key: 1
    clock.advance(2 * 86_400)
    await writer.append(envelopes(1, 30))  # the second is too old: a third
    async with db.connection() as conn:
        by_height = list(
            (
                await conn.execute(text("SELECT key_id FROM ledger_entries ORDER BY height"))
            ).scalars()
        )
        first, second, third = dict.fromkeys(by_height)  # in the order they were used
        assert by_height == [first] * 5 + [second, third]
        rows = await conn.execute(
            text(
                "SELECT k.key_id, k.sealed_entries, k.active, count(e.height) AS n"
                " FROM ledger_keys k LEFT JOIN ledger_entries e USING (key_id)"
                " GROUP BY k.key_id ORDER BY min(e.height)"
            )
        )
        counted = [(r.key_id, r.sealed_entries, r.n, r.active) for r in rows]
    assert counted == [(first, 5, 5, False), (second, 1, 1, False), (third, 1, 1, True)]
    for txn in ("UPI000000", "UPI000020", "UPI000030"):  # one of each key
        audit = await transaction_audit(db, MASTER, txn)
        assert audit["events"][0]["event"]["payload"]["payer_vpa"] == PAYER
    await writer.checkpoint_if_due(force=True)
    assert (await verify_ledger(db, clock, full=True)).valid


async def test_a_new_signing_key_signs_the_next_checkpoints_and_old_ones_still_verify(
    db, writer, clock
):
    await writer.append(envelopes(3))
    await writer.checkpoint_if_due(force=True)
    async with db.transaction() as conn:
        clock.advance(60)
        new = await keys.rotate_signing_key(conn, MASTER, clock.now())
    await writer.append(envelopes(3, 10))
    await writer.checkpoint_if_due(force=True)
    async with db.connection() as conn:
        signers = (
            await conn.execute(
                text("SELECT signing_key_id FROM ledger_checkpoints ORDER BY height")
            )
        ).scalars()
        signed_by = list(signers)
        public = await keys.public_keys(conn)
    assert len(set(signed_by)) == 2 and signed_by[-1] == new.key_id
    old_id = signed_by[0]
    assert (await verify_ledger(db, clock, full=True)).valid
    both = [public[old_id], public[new.key_id]]
    assert (await verify_ledger(db, clock, full=True, trusted_keys=both)).valid
    # A verifier that trusts only the new key refuses the checkpoint the old key signed.
    only_new = await verify_ledger(db, clock, full=True, trusted_keys=[public[new.key_id]])
    assert not only_new.valid

"""The stored tree, consistency proofs, witnesses' cosignatures and the move to format v2, on
the real PostgreSQL (issue 16)."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from api.bootstrap import all_migrations
from compliance import chain, keys, ledger, tree, verifier, witnesses
from compliance.ledger import LedgerWriter, export_lines, transaction_audit, verify_ledger
from core.clock import FakeClock
from core.storage import Database, migrate
from tests import ledger_verifier
from tests.integration.test_ledger import MASTER, envelopes
from tests.support import empty_database

pytestmark = pytest.mark.postgres

WITNESS = Ed25519PrivateKey.generate()
WITNESS_PEM = (
    WITNESS.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 12, 2, tzinfo=UTC))


@pytest.fixture
def writer(db, clock) -> LedgerWriter:
    return LedgerWriter(db, MASTER, clock)


async def _hashes(db) -> list[bytes]:
    async with db.connection() as conn:
        rows = await conn.execute(text("SELECT entry_hash FROM ledger_entries ORDER BY height"))
        return [bytes(h) for h in rows.scalars()]


async def _checkpoints(db) -> list[chain.Checkpoint]:
    return [
        chain.Checkpoint.from_export(line)
        async for line in export_lines(db)
        if line["type"] == "checkpoint"
    ]


async def test_the_stored_tree_gives_every_proof_the_definition_gives(db, writer, clock):
    rng = random.Random(16)
    appended = 0
    while appended < 2_300:  # appends of every size, with checkpoints on the way
        n = rng.choice([1, 3, 64, 255, 256, 257, 600])
        await writer.append(envelopes(n, start=appended))
        appended += n
        if rng.random() < 0.3:
            await writer.checkpoint_if_due(force=True)
    await writer.checkpoint_if_due(force=True)
    hashes = await _hashes(db)
    checkpoints = await _checkpoints(db)
    assert len(checkpoints) >= 5
    for a, b in itertools.pairwise(checkpoints):
        proof = await ledger.consistency_proof(db, a.height, b.height)
        assert proof == tree.reference_consistency_proof(a.height, hashes[: b.height])
        assert verifier.verify_consistency(a.height, b.height, a.merkle_root, b.merkle_root, proof)
    last = checkpoints[-1]
    for txn in ("UPI000000", "UPI000777", f"UPI{appended - 1:06d}"):
        [item] = (await transaction_audit(db, MASTER, txn))["events"]
        p = item["inclusion_proof"]
        assert verifier.verify_inclusion(
            p["leaf_index"],
            p["tree_size"],
            bytes.fromhex(item["entry"]["entry_hash"]),
            [bytes.fromhex(h) for h in p["audit_path"]],
            last.merkle_root,
        )
    with pytest.raises(ledger.ProofUnavailable):
        await ledger.consistency_proof(db, 10, appended + 1)
    with pytest.raises(ledger.ProofUnavailable):
        await ledger.consistency_proof(db, 0, 10)


async def test_a_lost_tree_is_built_again_from_the_entries(db, writer):
    await writer.append(envelopes(700))
    await writer.checkpoint_if_due(force=True)
    async with db.connection() as conn:
        before = (await conn.execute(text("SELECT level, idx, hashes FROM ledger_tiles"))).all()
    async with db.transaction() as conn:
        await conn.execute(text("DELETE FROM ledger_tiles"))
        await conn.execute(text("UPDATE ledger_state SET tiled = 0"))
    await ledger.ensure_tree(db)
    async with db.connection() as conn:
        after = (await conn.execute(text("SELECT level, idx, hashes FROM ledger_tiles"))).all()
    assert sorted(map(tuple, after)) == sorted(map(tuple, before))
    # And a writer whose cached tiles are stale still extends the right ones.
    await writer.append(envelopes(300, start=700))
    await writer.checkpoint_if_due(force=True)
    hashes = await _hashes(db)
    [a, b] = await _checkpoints(db)
    assert await ledger.consistency_proof(db, a.height, b.height) == (
        tree.reference_consistency_proof(a.height, hashes)
    )


async def test_verify_finds_a_changed_tile(db, writer, clock):
    await writer.append(envelopes(70_000 // 100))
    await writer.append(envelopes(66_000, start=700))  # two tile levels
    await writer.checkpoint_if_due(force=True)
    assert (await verify_ledger(db, clock, full=True)).valid
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE ledger_tiles SET hashes = set_byte(hashes, 5, get_byte(hashes, 5) # 1)"
                 " WHERE level = 1 AND idx = 0")
        )  # fmt: skip
    result = await verify_ledger(db, clock, full=True)
    assert not result.valid and "tile (1, 0)" in (result.reason or ""), result
    # The tree is derived from the entries: rebuilt, it verifies again.
    async with db.transaction() as conn:
        await conn.execute(text("DELETE FROM ledger_tiles"))
        await conn.execute(text("UPDATE ledger_state SET tiled = 0"))
    await ledger.ensure_tree(db)
    assert (await verify_ledger(db, clock, full=True)).valid
    async with db.transaction() as conn:  # a leaf now
        await conn.execute(
            text("UPDATE ledger_tiles SET hashes = set_byte(hashes, 99, get_byte(hashes, 99) # 1)"
                 " WHERE level = 0 AND idx = 3")
        )  # fmt: skip
    result = await verify_ledger(db, clock, full=True)
    assert not result.valid and "tile (0, 3)" in (result.reason or ""), result


async def test_cosignatures_are_checked_stored_exported_and_publish_a_checkpoint(db, writer, clock):
    await writer.append(envelopes(50))
    first = await writer.checkpoint_if_due(force=True)
    await writer.append(envelopes(50, start=50))
    second = await writer.checkpoint_if_due(force=True)
    assert first is not None and second is not None
    w = await witnesses.register_witness(db, clock.now(), name="auditor-1", public_pem=WITNESS_PEM)
    assert w.witness_key_id == verifier.witness_key_id(WITNESS.public_key())
    cosig = chain.cosign(
        WITNESS, first, witness_key_id_=w.witness_key_id, cosigned_at="2026-12-02T00:00:01Z"
    )
    assert await witnesses.record_cosignature(db, clock.now(), cosig) is True
    assert await witnesses.record_cosignature(db, clock.now(), cosig) is False  # a repeat
    forged = chain.Cosignature(second.height, w.witness_key_id, cosig.cosigned_at, cosig.signature)
    with pytest.raises(witnesses.BadCosignature):
        await witnesses.record_cosignature(db, clock.now(), forged)
    stranger = chain.Cosignature(first.height, "wk-0000000000000000", "x", b"s")
    with pytest.raises(witnesses.UnknownWitness):
        await witnesses.record_cosignature(db, clock.now(), stranger)
    with pytest.raises(witnesses.UnknownCheckpoint):
        await witnesses.record_cosignature(
            db, clock.now(), chain.Cosignature(77, w.witness_key_id, "x", b"s")
        )
    # With one witness required, the published checkpoint is the cosigned one, and
    # auditors' proofs are in its tree.
    assert (await ledger.latest_checkpoint(db)).height == 100
    assert (await ledger.latest_checkpoint(db, witnesses_required=1)).height == 50
    assert await ledger.latest_checkpoint(db, witnesses_required=2) is None
    audit = await transaction_audit(db, MASTER, "UPI000010", witnesses_required=1)
    assert audit["checkpoint"]["height"] == 50
    assert audit["events"][0]["inclusion_proof"]["tree_size"] == 50
    late = await transaction_audit(db, MASTER, "UPI000070", witnesses_required=1)
    assert late["events"][0]["inclusion_proof"] is None
    assert await witnesses.witness_lags(db) == {"auditor-1": 50}
    # The export carries the consistency proof 50→100 and the cosignature, and verifies
    # with the witness required.
    lines = [line async for line in export_lines(db)]
    kinds = [x["type"] for x in lines if x["type"] != "entry"]
    assert kinds == ["header", "checkpoint", "cosignature", "checkpoint", "consistency"]
    async with db.connection() as conn:
        public = list((await keys.public_keys(conn)).values())
    result = verifier.verify_export(lines, public, witness_keys=[WITNESS.public_key()])
    assert result.valid and result.witnessed == {w.witness_key_id: 50}, result
    assert ledger_verifier.verify(lines, public[0])[0]


async def test_an_existing_ledger_moves_to_v2_at_its_height_without_rewriting_a_row(
    pg_server, clock
):
    """A ledger written before format 2 (v1 AAD, no stored tree): after the migration, new
    entries are sealed in v2, old ones still decrypt with v1, the tree is built, the rows
    are the same bytes, and everything verifies."""
    db = await empty_database(pg_server, "v1")
    try:
        older = [m for m in all_migrations() if m.id != "compliance.0002_tree_witnesses_v2"]
        await migrate(db, older)
        await _write_v1_ledger(db, clock, 30)
        async with db.connection() as conn:
            rows_before = (await conn.execute(text("SELECT * FROM ledger_entries"))).all()
        assert "compliance.0002_tree_witnesses_v2" in await migrate(db, all_migrations())
        writer = LedgerWriter(db, MASTER, clock)
        await writer.append(envelopes(20, start=30))
        await writer.checkpoint_if_due(force=True)
        async with db.connection() as conn:
            rows_after = (
                await conn.execute(text("SELECT * FROM ledger_entries WHERE height < 30"))
            ).all()
            v2_from = (await conn.execute(text("SELECT v2_from FROM ledger_state"))).scalar_one()
        assert rows_after == rows_before and v2_from == 30
        for txn in ("UPI000005", "UPI000040"):  # one v1, one v2
            [item] = (await transaction_audit(db, MASTER, txn))["events"]
            assert item["event"]["payload"]["transaction_id"] == txn
            assert item["inclusion_proof"]["tree_size"] == 50
        assert (await verify_ledger(db, clock, full=True)).valid
        lines = [line async for line in export_lines(db)]
        assert lines[0] == {"type": "header", "format": 2, "from_height": 0, "v2_from_height": 30}
        async with db.connection() as conn:
            public = list((await keys.public_keys(conn)).values())
        assert verifier.verify_export(lines, public).valid
        assert ledger_verifier.verify(lines, public[0])[0]
    finally:
        await db.close()


async def _write_v1_ledger(db: Database, clock: FakeClock, n: int) -> None:
    """Entries as the engine wrote them before format 2: AAD ``a|b|c|d``, no tiles."""
    now = clock.now()
    async with db.transaction() as conn:
        data_key = await keys.active_data_key(conn, MASTER, now)
        signer = await keys.active_signing_key(conn, MASTER, now)
        prev, hashes = chain.GENESIS_PREV, []
        for h, envelope in enumerate(envelopes(n)):
            payload = envelope.to_dict()
            txn = envelope.transaction_id or ""
            nonce, ct = chain.seal(
                data_key.key,
                data_key.key_id,
                payload,
                event_id=payload["event_id"],
                event_type=envelope.event_type,
                transaction_id=txn,
                fmt=1,
            )
            e = chain.build_entry(
                prev,
                h,
                event_id=payload["event_id"],
                event_type=envelope.event_type,
                transaction_id=txn,
                recorded_at="2026-12-01T00:00:00.000000Z",
                key_id=data_key.key_id,
                nonce=nonce,
                ciphertext=ct,
            )
            await conn.execute(
                text(
                    "INSERT INTO ledger_entries VALUES (:h, CAST(:e AS uuid), :t, :x, :r, :k,"
                    " :n, :c, :p, :d)"
                ),
                {
                    "h": h,
                    "e": e.event_id,
                    "t": e.event_type,
                    "x": e.transaction_id,
                    "r": e.recorded_at,
                    "k": e.key_id,
                    "n": e.nonce,
                    "c": e.ciphertext,
                    "p": e.prev_hash,
                    "d": e.entry_hash,
                },
            )
            prev = e.entry_hash
            hashes.append(prev)
        acc = chain.MerkleAccumulator()
        acc.extend(hashes)
        cp = chain.sign_checkpoint(
            signer.private,
            height=n,
            head_hash=prev,
            merkle_root_=acc.root(),
            signed_at="2026-12-01T00:00:01.000000Z",
            signing_key_id=signer.key_id,
        )
        await conn.execute(
            text("INSERT INTO ledger_checkpoints VALUES (:h, :hh, :r, :at, :k, :s)"),
            {
                "h": n,
                "hh": cp.head_hash,
                "r": cp.merkle_root,
                "at": cp.signed_at,
                "k": cp.signing_key_id,
                "s": cp.signature,
            },
        )
        await conn.execute(
            text(
                "INSERT INTO ledger_state (id, size, head_hash, frontier, checkpoint_height,"
                " checkpoint_at) VALUES (1, :s, :h, :f, :s, :at)"
            ),
            {"s": n, "h": prev, "f": acc.frontier, "at": now},
        )


async def test_verify_with_the_callers_keys_catches_a_replaced_signing_key(db, writer, clock):
    """Someone who can write the database re-signs every checkpoint with a key of their
    own and stores its public half: verification that trusts the database passes; with
    the key the auditor holds, it fails at the first checkpoint."""
    await writer.append(envelopes(30))
    await writer.checkpoint_if_due(force=True)
    async with db.connection() as conn:
        [genuine] = (await keys.public_keys(conn)).values()
    assert (await verify_ledger(db, clock, full=True, trusted_keys=[genuine])).valid
    mallory = Ed25519PrivateKey.generate()
    async with db.transaction() as conn:
        rows = (await conn.execute(text("SELECT * FROM ledger_checkpoints"))).all()
        for r in rows:
            forged = chain.sign_checkpoint(
                mallory,
                height=r.height,
                head_hash=bytes(r.head_hash),
                merkle_root_=bytes(r.merkle_root),
                signed_at=r.signed_at,
                signing_key_id=r.signing_key_id,
            )
            await conn.execute(
                text("UPDATE ledger_checkpoints SET signature = :s WHERE height = :h"),
                {"s": forged.signature, "h": r.height},
            )
        pem = mallory.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        await conn.execute(
            text("UPDATE ledger_signing_keys SET public_pem = :p"), {"p": pem.decode()}
        )
    assert (await verify_ledger(db, clock, full=True)).valid  # the database vouches for itself
    result = await verify_ledger(db, clock, full=True, trusted_keys=[genuine])
    assert not result.valid and result.first_bad_height == 29 and "signature" in result.reason

"""The witnesses the operator relies on, and the cosignatures they send (SPEC §6).

A witness (``upi-engine ledger witness``, run by someone other than the engine's operator)
keeps the last checkpoint it accepted, checks that each newer one is consistent with it,
and cosigns it with its own Ed25519 key. The engine stores each cosignature once it has
checked it against the witness's registered key and the stored checkpoint, and exports
them beside the checkpoints. With ``UPI_LEDGER_WITNESSES_REQUIRED`` = N, a checkpoint
counts as *published* (auditors' inclusion proofs use it) once N witnesses cosigned it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from compliance import chain
from compliance.ledger import checkpoint_at
from compliance.verifier import load_public_key, witness_key_id
from core.storage import Database, sql_text

__all__ = [
    "BadCosignature",
    "UnknownCheckpoint",
    "UnknownWitness",
    "Witness",
    "list_witnesses",
    "record_cosignature",
    "register_witness",
    "witness_lags",
]


class UnknownWitness(LookupError):
    pass


class UnknownCheckpoint(LookupError):
    pass


class BadCosignature(ValueError):
    pass


@dataclass(frozen=True)
class Witness:
    witness_key_id: str
    name: str
    public_pem: str
    created_at: datetime
    last_cosigned: int | None = None


async def register_witness(db: Database, now: datetime, *, name: str, public_pem: str) -> Witness:
    """Register (or rename) a witness by its public key; returns it with its key id."""
    key = load_public_key(public_pem.encode())
    key_id = witness_key_id(key)
    async with db.transaction() as conn:
        await conn.execute(
            sql_text(
                "INSERT INTO ledger_witnesses (witness_key_id, name, public_pem, created_at)"
                " VALUES (:k, :n, :p, :at)"
                " ON CONFLICT (witness_key_id) DO UPDATE SET name = EXCLUDED.name"
            ),
            {"k": key_id, "n": name, "p": public_pem, "at": now},
        )
    return Witness(key_id, name, public_pem, now)


async def list_witnesses(
    db: Database, *, limit: int | None = None, after: str | None = None
) -> list[Witness]:
    """Witnesses oldest first: at most ``limit`` (None: all), those after the witness key
    ``after`` (a keyset on (created_at, witness_key_id); an unknown one: none)."""
    async with db.connection() as conn:
        rows = await conn.execute(
            sql_text(
                "SELECT w.witness_key_id, w.name, w.public_pem, w.created_at,"
                " (SELECT max(height) FROM ledger_cosignatures c"
                "  WHERE c.witness_key_id = w.witness_key_id) AS last_cosigned"
                " FROM ledger_witnesses w WHERE CAST(:after AS text) IS NULL"
                " OR (w.created_at, w.witness_key_id) > (SELECT created_at, witness_key_id"
                " FROM ledger_witnesses WHERE witness_key_id = :after)"
                " ORDER BY w.created_at, w.witness_key_id LIMIT :n"
            ),
            {"after": after, "n": limit},
        )
        return [
            Witness(
                r.witness_key_id,
                r.name,
                r.public_pem,
                r.created_at,
                int(r.last_cosigned) if r.last_cosigned is not None else None,
            )
            for r in rows
        ]


async def record_cosignature(db: Database, now: datetime, cosignature: chain.Cosignature) -> bool:
    """Check and store a witness's cosignature; True when it is new, False when the same
    witness had cosigned that checkpoint already."""
    found = await checkpoint_at(db, cosignature.height)  # checkpoints never change
    if found is None:
        raise UnknownCheckpoint(cosignature.height)
    checkpoint = found[0]
    async with db.transaction() as conn:
        pem = (
            await conn.execute(
                sql_text("SELECT public_pem FROM ledger_witnesses WHERE witness_key_id = :k"),
                {"k": cosignature.witness_key_id},
            )
        ).scalar()
        if pem is None:
            raise UnknownWitness(cosignature.witness_key_id)
        key: Ed25519PublicKey = load_public_key(str(pem).encode())
        if not cosignature.valid_for(checkpoint, key):
            raise BadCosignature(
                f"the cosignature does not verify for checkpoint {cosignature.height}"
            )
        inserted = (
            await conn.execute(
                sql_text(
                    "INSERT INTO ledger_cosignatures (height, witness_key_id, cosigned_at,"
                    " signature, received_at) VALUES (:h, :k, :at, :s, :now)"
                    " ON CONFLICT (height, witness_key_id) DO NOTHING RETURNING height"
                ),
                {
                    "h": cosignature.height,
                    "k": cosignature.witness_key_id,
                    "at": cosignature.cosigned_at,
                    "s": cosignature.signature,
                    "now": now,
                },
            )
        ).first()
    return inserted is not None


async def witness_lags(db: Database) -> dict[str, int]:
    """For each registered witness (by name), how many entries the newest checkpoint is
    ahead of the newest one it cosigned (all of it when it never cosigned one)."""
    async with db.connection() as conn:
        latest = (
            await conn.execute(sql_text("SELECT COALESCE(max(height), 0) FROM ledger_checkpoints"))
        ).scalar_one()
    return {w.name: int(latest) - (w.last_cosigned or 0) for w in await list_witnesses(db)}

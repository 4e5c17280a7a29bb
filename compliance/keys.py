"""Envelope encryption for the ledger: data keys and the checkpoint signing key, both stored
wrapped by the master key (SPEC §2), never in clear.

* ``rotate_data_key`` makes a new active data key; old ones keep decrypting (each entry
  names its ``key_id``).
* ``shred_data_keys`` destroys data keys past retention (7 years): the entries they sealed
  become unreadable while the chain, which hashes ciphertext, still verifies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncConnection

from core.crypto import MasterKey
from core.keyring import SealedColumn
from core.storage import sql_text

__all__ = [
    "RETENTION",
    "SEALED",
    "DataKey",
    "DataKeyPolicy",
    "KeyDestroyed",
    "SigningKey",
    "active_data_key",
    "active_signing_key",
    "data_key",
    "data_key_for",
    "public_keys",
    "rotate_data_key",
    "rotate_signing_key",
    "shred_data_keys",
]

_SIGNING_LOCK = 0x736B_726F  # "skro": one signing-key rotation at a time

RETENTION = timedelta(days=7 * 365 + 2)  # 7 years, leap days included

# What this context seals under the master key (core/keyring.py re-wraps them).
SEALED = (
    SealedColumn("ledger_keys", "key_id", "wrapped", "key_id", b"upi-engine:data-key:"),
    SealedColumn(
        "ledger_signing_keys", "key_id", "wrapped_private", "key_id", b"upi-engine:signing-key:"
    ),
)


class KeyDestroyed(Exception):
    """The data key was crypto-shredded: its payloads are gone for good."""


@dataclass(frozen=True)
class DataKey:
    key_id: str
    key: bytes

    def __repr__(self) -> str:
        return f"DataKey({self.key_id!r}, <redacted>)"


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    private: Ed25519PrivateKey
    public_pem: str


def _aad(kind: str, key_id: str) -> bytes:
    return f"upi-engine:{kind}:{key_id}".encode()


@dataclass(frozen=True)
class DataKeyPolicy:
    """When the ledger writer starts a new data key on its own (PCI DSS 3.6.1: a key's
    cryptoperiod). Entries are sealed with random 96-bit nonces, so a key must seal far
    fewer than 2^32 of them (NIST SP 800-38D, 8.3); a hundred million keeps the chance of
    a repeated nonce below 10^-12."""

    max_age: timedelta = timedelta(days=90)
    max_entries: int = 100_000_000


async def rotate_data_key(
    conn: AsyncConnection, master: MasterKey, now: datetime, *, sealed_entries: int = 0
) -> DataKey:
    key_id = f"dk-{now:%Y%m%d%H%M%S}-{os.urandom(3).hex()}"
    raw = os.urandom(32)
    await conn.execute(sql_text("UPDATE ledger_keys SET active = false WHERE active"))
    await conn.execute(
        sql_text(
            "INSERT INTO ledger_keys (key_id, wrapped, active, created_at, sealed_entries)"
            " VALUES (:k, :w, true, :at, :n)"
        ),
        {
            "k": key_id,
            "w": master.seal(raw, _aad("data-key", key_id)),
            "at": now,
            "n": sealed_entries,
        },
    )
    return DataKey(key_id, raw)


async def data_key_for(
    conn: AsyncConnection, master: MasterKey, now: datetime, entries: int, policy: DataKeyPolicy
) -> DataKey:
    """The data key to seal ``entries`` more entries with, counted against it: the active
    one, or a new one when the active one is older than the policy's age or would pass its
    count. One statement when the active key goes on (the writer holds the append lock)."""
    row = (
        await conn.execute(
            sql_text(
                "UPDATE ledger_keys SET sealed_entries = sealed_entries + :n"
                " WHERE active AND created_at > :oldest AND sealed_entries + :n <= :most"
                " RETURNING key_id, wrapped"
            ),
            {"n": entries, "oldest": now - policy.max_age, "most": policy.max_entries},
        )
    ).first()
    if row is None:
        return await rotate_data_key(conn, master, now, sealed_entries=entries)
    return DataKey(row.key_id, master.open(bytes(row.wrapped), _aad("data-key", row.key_id)))


async def active_data_key(conn: AsyncConnection, master: MasterKey, now: datetime) -> DataKey:
    row = (
        await conn.execute(sql_text("SELECT key_id, wrapped FROM ledger_keys WHERE active"))
    ).first()
    if row is None:
        return await rotate_data_key(conn, master, now)
    return DataKey(row.key_id, master.open(bytes(row.wrapped), _aad("data-key", row.key_id)))


async def data_key(conn: AsyncConnection, master: MasterKey, key_id: str) -> DataKey:
    row = (
        await conn.execute(
            sql_text("SELECT wrapped FROM ledger_keys WHERE key_id = :k"), {"k": key_id}
        )
    ).first()
    if row is None or row.wrapped is None:
        raise KeyDestroyed(key_id)
    return DataKey(key_id, master.open(bytes(row.wrapped), _aad("data-key", key_id)))


async def shred_data_keys(
    conn: AsyncConnection, now: datetime, retention: timedelta = RETENTION
) -> list[str]:
    """Destroy every inactive data key created before ``now - retention``."""
    rows = await conn.execute(
        sql_text(
            "UPDATE ledger_keys SET wrapped = NULL, destroyed_at = :now"
            " WHERE wrapped IS NOT NULL AND NOT active AND created_at < :before"
            " RETURNING key_id"
        ),
        {"now": now, "before": now - retention},
    )
    return sorted(rows.scalars())


async def active_signing_key(conn: AsyncConnection, master: MasterKey, now: datetime) -> SigningKey:
    row = (
        await conn.execute(
            sql_text(
                "SELECT key_id, wrapped_private, public_pem FROM ledger_signing_keys WHERE active"
            )
        )
    ).first()
    if row is not None:
        raw = master.open(bytes(row.wrapped_private), _aad("signing-key", row.key_id))
        return SigningKey(row.key_id, Ed25519PrivateKey.from_private_bytes(raw), row.public_pem)
    made = await _new_signing_key(conn, master, now)
    if made is None:  # another writer made one first
        return await active_signing_key(conn, master, now)
    return made


async def rotate_signing_key(conn: AsyncConnection, master: MasterKey, now: datetime) -> SigningKey:
    """A new checkpoint signing key. Checkpoints name the key that signed them
    (``signing_key_id``); the old public keys stay, so older checkpoints still verify."""
    await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SIGNING_LOCK})
    await conn.execute(sql_text("UPDATE ledger_signing_keys SET active = false WHERE active"))
    made = await _new_signing_key(conn, master, now)
    assert made is not None  # nobody else holds an active key: the lock and the update
    return made


async def _new_signing_key(
    conn: AsyncConnection, master: MasterKey, now: datetime
) -> SigningKey | None:
    private = Ed25519PrivateKey.generate()
    key_id = f"sk-{now:%Y%m%d%H%M%S}-{os.urandom(3).hex()}"
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    inserted = await conn.execute(
        sql_text(
            "INSERT INTO ledger_signing_keys (key_id, wrapped_private, public_pem, active,"
            " created_at) VALUES (:k, :w, :p, true, :at) ON CONFLICT DO NOTHING RETURNING 1"
        ),
        {"k": key_id, "w": master.seal(raw, _aad("signing-key", key_id)), "p": pem, "at": now},
    )
    if inserted.first() is None:
        return None
    return SigningKey(key_id, private, pem)


async def public_keys(conn: AsyncConnection) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for row in await conn.execute(sql_text("SELECT key_id, public_pem FROM ledger_signing_keys")):
        key = serialization.load_pem_public_key(row.public_pem.encode())
        assert isinstance(key, Ed25519PublicKey)
        keys[row.key_id] = key
    return keys

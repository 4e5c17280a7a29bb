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
    "KeyDestroyed",
    "SigningKey",
    "active_data_key",
    "active_signing_key",
    "data_key",
    "public_keys",
    "rotate_data_key",
    "shred_data_keys",
]

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


async def rotate_data_key(conn: AsyncConnection, master: MasterKey, now: datetime) -> DataKey:
    key_id = f"dk-{now:%Y%m%d%H%M%S}-{os.urandom(3).hex()}"
    raw = os.urandom(32)
    await conn.execute(sql_text("UPDATE ledger_keys SET active = false WHERE active"))
    await conn.execute(
        sql_text(
            "INSERT INTO ledger_keys (key_id, wrapped, active, created_at)"
            " VALUES (:k, :w, true, :at)"
        ),
        {"k": key_id, "w": master.seal(raw, _aad("data-key", key_id)), "at": now},
    )
    return DataKey(key_id, raw)


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
    if inserted.first() is None:  # another writer made one first
        return await active_signing_key(conn, master, now)
    return SigningKey(key_id, private, pem)


async def public_keys(conn: AsyncConnection) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for row in await conn.execute(sql_text("SELECT key_id, public_pem FROM ledger_signing_keys")):
        key = serialization.load_pem_public_key(row.public_pem.encode())
        assert isinstance(key, Ed25519PublicKey)
        keys[row.key_id] = key
    return keys

"""What is sealed under the master key, and rotating the master key (PCI DSS 3.6, 3.7).

Every secret the engine keeps at rest is sealed (AES-256-GCM) under the master key: the
ledger's data keys and checkpoint signing keys (compliance), webhook secrets and dispute
evidence (payments), the key of the keyed pseudonyms and the PII field key (here). Each
context lists its sealed columns as :class:`SealedColumn`; the composition root hands them
all to
:func:`rotate_master_key`, which opens every value under the old key and seals it under the
new one in one transaction: after the commit nothing opens under the old key.

The database also holds a check value sealed under the master key (:func:`bind_master_key`):
an engine started with another key stops at once with one line, instead of failing later
on the first secret it opens. The pseudonym key is stored too, sealed, so that a new master
key keeps every pseudonym (fraud history, payee lookups) the same; and so is the PII field
key, so that PII sealed in rows and events before a rotation opens after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlalchemy.ext.asyncio import AsyncConnection

from core.crypto import MasterKey
from core.errors import ConfigError
from core.storage import sql_text

__all__ = [
    "CORE_SEALED",
    "Rewrapped",
    "SealedColumn",
    "WrongMasterKey",
    "bind_master_key",
    "rotate_master_key",
]

_CHECK = b"upi-engine master key check v1"
_CHECK_AAD = b"upi-engine:master-key-check"
_PSEUDONYM_AAD = b"upi-engine:pseudonym-key"
_FIELD_AAD = b"upi-engine:field-key"
_ROTATE_LOCK = 0x6D6B_726F  # "mkro": one rotation at a time


@dataclass(frozen=True)
class SealedColumn:
    """A column of values sealed under the master key. Each value's AAD is ``aad_prefix``
    followed by the text of ``aad_column`` (empty prefix: the column's text alone)."""

    table: str
    key_column: str  # the row's primary key
    column: str
    aad_column: str
    aad_prefix: bytes = b""

    def aad(self, value: str) -> bytes:
        return self.aad_prefix + value.encode()


# The core's own: the check value, the pseudonym key and the field key (one row, id 1).
CORE_SEALED = (
    SealedColumn("master_key_check", "id", "check_sealed", "id", _CHECK_AAD + b"|"),
    SealedColumn("master_key_check", "id", "pseudonym_key_sealed", "id", _PSEUDONYM_AAD + b"|"),
    SealedColumn("master_key_check", "id", "field_key_sealed", "field_key_id", _FIELD_AAD + b"|"),
)


class WrongMasterKey(ConfigError):
    pass


async def bind_master_key(conn: AsyncConnection, master: MasterKey) -> None:
    """Check that ``master`` is this database's master key and give it the stored pseudonym
    and field keys. The first engine on a database stores them (the keys it has derived);
    the first after migration ``core.0004`` stores its field key beside the others."""
    row = (
        await conn.execute(
            sql_text(
                "SELECT check_sealed, pseudonym_key_sealed, field_key_id, field_key_sealed"
                " FROM master_key_check WHERE id = 1"
            )
        )
    ).first()
    if row is None:
        await conn.execute(
            sql_text(
                "INSERT INTO master_key_check (id, check_sealed, pseudonym_key_sealed)"
                " VALUES (1, :c, :p) ON CONFLICT (id) DO NOTHING"
            ),
            {
                "c": master.seal(_CHECK, CORE_SEALED[0].aad("1")),
                "p": master.seal(master.pseudonym_key_bytes(), CORE_SEALED[1].aad("1")),
            },
        )
        return await bind_master_key(conn, master)  # whoever inserted first decides
    try:
        check = master.open(bytes(row.check_sealed), CORE_SEALED[0].aad("1"))
        pseudonym_key = master.open(bytes(row.pseudonym_key_sealed), CORE_SEALED[1].aad("1"))
    except (InvalidTag, ValueError):
        check = b""
        pseudonym_key = b""
    if check != _CHECK:
        raise WrongMasterKey(
            "UPI_MASTER_KEY: this is not the database's master key (was it rotated with"
            " `upi-engine keys rotate-master`? use the new key)"
        )
    master.use_pseudonym_key(pseudonym_key)
    if row.field_key_sealed is None:
        await conn.execute(
            sql_text(
                "UPDATE master_key_check SET field_key_id = :i, field_key_sealed = :f"
                " WHERE id = 1 AND field_key_sealed IS NULL"
            ),
            {
                "i": master.field_key_id,
                "f": master.seal(master.field_key_bytes(), CORE_SEALED[2].aad(master.field_key_id)),
            },
        )
        return await bind_master_key(conn, master)  # whoever stored first decides
    field_key = master.open(bytes(row.field_key_sealed), CORE_SEALED[2].aad(row.field_key_id))
    master.use_field_key(row.field_key_id, field_key)


@dataclass(frozen=True)
class Rewrapped:
    column: str  # "<table>.<column>"
    values: int


async def rotate_master_key(
    conn: AsyncConnection, old: MasterKey, new: MasterKey, columns: Sequence[SealedColumn]
) -> list[Rewrapped]:
    """Open every sealed value under ``old`` and seal it under ``new``, in the caller's
    transaction. A value ``old`` cannot open stops the rotation (nothing is changed)."""
    await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ROTATE_LOCK})
    await bind_master_key(conn, old)
    done = []
    for col in [*CORE_SEALED, *columns]:
        rows = (
            await conn.execute(
                sql_text(
                    f"SELECT {col.key_column}::text AS k, {col.aad_column}::text AS a,"
                    f" {col.column} AS v FROM {col.table} WHERE {col.column} IS NOT NULL"
                    f" ORDER BY {col.key_column} FOR UPDATE"
                )
            )
        ).all()
        keys, sealed = [], []
        for row in rows:
            aad = col.aad(row.a)
            try:
                plain = old.open(bytes(row.v), aad)
            except (InvalidTag, ValueError):  # a wrong key, or not a sealed value at all
                raise WrongMasterKey(
                    f"{col.table}.{col.column} {row.k}: does not open under the current"
                    " master key; nothing was rotated"
                ) from None
            keys.append(row.k)
            sealed.append(new.seal(plain, aad))
        if keys:
            await conn.execute(
                sql_text(
                    f"UPDATE {col.table} t SET {col.column} = u.v"
                    " FROM unnest(CAST(:ks AS text[]), CAST(:vs AS bytea[])) AS u(k, v)"
                    f" WHERE t.{col.key_column}::text = u.k"
                ),
                {"ks": keys, "vs": sealed},
            )
        done.append(Rewrapped(f"{col.table}.{col.column}", len(keys)))
    await conn.execute(sql_text("UPDATE master_key_check SET rotated_at = now() WHERE id = 1"))
    new.use_pseudonym_key(old.pseudonym_key_bytes())
    new.use_field_key(old.field_key_id, old.field_key_bytes())
    return done

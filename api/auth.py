"""Bearer tokens for merchants, auditors and operators; stored only as SHA-256 hashes.

A principal (a merchant, an auditor, an operator) holds one or more credentials: each has an
id (``cred_…``), the token's first characters to recognise it by, a creation time, an
optional expiry, a revocation time and a last-used time. Rotating a key adds a credential
and gives the principal's others an expiry (the grace period); revoking one ends it. Every
gateway process caches a token's principal for at most a second, so a revoked or expired
token stops working within a second everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import NotFound
from core.ids import new_event_id, new_token
from core.storage import Database, sql_text

__all__ = [
    "Credential",
    "Principal",
    "Role",
    "TokenCache",
    "add_credential",
    "authenticate",
    "issue_token",
    "list_credentials",
    "revoke_credential",
    "rotate_credentials",
]

_PREFIX_CHARS = 12  # "upi_sk_" and 5 random characters: enough to tell keys apart
_LAST_USED_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often


class Role(StrEnum):
    MERCHANT = "merchant"
    AUDITOR = "auditor"
    OPERATOR = "operator"


_PREFIX = {Role.MERCHANT: "upi_sk", Role.AUDITOR: "upi_au", Role.OPERATOR: "upi_op"}


@dataclass(frozen=True)
class Principal:
    principal_id: str
    role: Role
    name: str
    merchant_id: str | None


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue_token(
    conn: AsyncConnection,
    *,
    principal_id: str,
    role: Role,
    name: str,
    merchant_id: str | None = None,
) -> str:
    """Create a principal with one credential and return its token (shown once)."""
    await conn.execute(
        sql_text(
            "INSERT INTO principals (principal_id, role, name, merchant_id)"
            " VALUES (:id, :r, :n, :m)"
        ),
        {"id": principal_id, "r": role.value, "n": name, "m": merchant_id},
    )
    _, token = await add_credential(conn, principal_id, role)
    return token


async def add_credential(
    conn: AsyncConnection, principal_id: str, role: Role, *, expires_at: datetime | None = None
) -> tuple[str, str]:
    """A new credential of ``principal_id``: (its id, its token, shown once)."""
    token = new_token(_PREFIX[role])
    credential_id = "cred_" + new_event_id().hex[:20]
    await conn.execute(
        sql_text(
            "INSERT INTO credentials (credential_id, principal_id, prefix, token_hash,"
            " expires_at) VALUES (:c, :p, :prefix, :h, :exp)"
        ),
        {
            "c": credential_id,
            "p": principal_id,
            "prefix": token[:_PREFIX_CHARS],
            "h": _hash(token),
            "exp": expires_at,
        },
    )
    return credential_id, token


async def rotate_credentials(
    conn: AsyncConnection, principal_id: str, role: Role, *, grace: timedelta, now: datetime
) -> tuple[str, str, datetime]:
    """A new credential for ``principal_id``; its other live credentials keep working for
    ``grace`` (never longer than they already would). Returns (id, token, their end)."""
    ends = now + grace
    await conn.execute(
        sql_text(
            "UPDATE credentials SET expires_at = LEAST(coalesce(expires_at, :ends), :ends)"
            " WHERE principal_id = :p AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > :now)"
        ),
        {"p": principal_id, "ends": ends, "now": now},
    )
    credential_id, token = await add_credential(conn, principal_id, role)
    return credential_id, token, ends


@dataclass(frozen=True)
class Credential:
    credential_id: str
    principal_id: str
    role: Role
    name: str
    merchant_id: str | None
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def view(self, now: datetime) -> dict[str, Any]:
        def iso(at: datetime | None) -> str | None:
            return at.isoformat().replace("+00:00", "Z") if at else None

        return {
            "credential_id": self.credential_id,
            "principal_id": self.principal_id,
            "role": self.role.value,
            "name": self.name,
            "merchant_id": self.merchant_id,
            "prefix": self.prefix,
            "status": self.status(now),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }


async def list_credentials(
    conn: AsyncConnection, *, limit: int | None = None, after: str | None = None
) -> list[Credential]:
    """Credentials oldest first: at most ``limit`` (None: all), those after the credential
    ``after`` (a keyset on (created_at, credential_id); an unknown one: none)."""
    rows = await conn.execute(
        sql_text(
            "SELECT c.credential_id, c.principal_id, p.role, p.name, p.merchant_id, c.prefix,"
            " c.created_at, c.expires_at, c.revoked_at, c.last_used_at FROM credentials c"
            " JOIN principals p USING (principal_id)"
            " WHERE CAST(:after AS text) IS NULL OR (c.created_at, c.credential_id) >"
            " (SELECT created_at, credential_id FROM credentials WHERE credential_id = :after)"
            " ORDER BY c.created_at, c.credential_id LIMIT :n"
        ),
        {"after": after, "n": limit},
    )
    return [
        Credential(
            r.credential_id,
            r.principal_id,
            Role(r.role),
            r.name,
            r.merchant_id,
            r.prefix,
            r.created_at,
            r.expires_at,
            r.revoked_at,
            r.last_used_at,
        )
        for r in rows
    ]


async def revoke_credential(conn: AsyncConnection, credential_id: str, now: datetime) -> bool:
    """Revoke a credential at once; False if it was revoked already. NotFound if unknown."""
    row = (
        await conn.execute(
            sql_text(
                "UPDATE credentials SET revoked_at = coalesce(revoked_at, :now)"
                " WHERE credential_id = :c RETURNING revoked_at = :now AS now_revoked"
            ),
            {"c": credential_id, "now": now},
        )
    ).first()
    if row is None:
        raise NotFound(f"no credential {credential_id}")
    return bool(row.now_revoked)


class TokenCache:
    """Principals of tokens seen in the last ``ttl_s`` seconds, so that a merchant sending a
    thousand payments a second costs one lookup a second, not one per request (and no
    connection checkout). Only hits are kept, by the token's hash: an unknown token is
    looked up every time, and a revoked one stops working within ``ttl_s``."""

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def get(self, digest: bytes) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._entries[digest]
            return None
        return entry[1]

    def put(self, digest: bytes, principal: Principal) -> None:
        if len(self._entries) >= self._max:
            self._entries.clear()  # crude, and rare: at most one lookup per token again
        self._entries[digest] = (time.monotonic() + self.ttl_s, principal)


async def authenticate(
    db: Database, token: str, cache: TokenCache | None = None
) -> Principal | None:
    if not token or len(token) > 200:
        return None
    digest = _hash(token)
    if cache is not None and (known := cache.get(digest)) is not None:
        return known
    async with db.connection() as conn:
        row = (
            await conn.execute(
                sql_text(
                    "SELECT p.principal_id, p.role, p.name, p.merchant_id, c.token_hash,"
                    " c.credential_id, c.last_used_at IS NULL"
                    " OR c.last_used_at < now() - CAST(:every AS interval)"
                    " AS stale FROM credentials c JOIN principals p USING (principal_id)"
                    " WHERE c.token_hash = :h AND c.revoked_at IS NULL"
                    " AND (c.expires_at IS NULL OR c.expires_at > now())"
                ),
                {"h": digest, "every": _LAST_USED_EVERY},
            )
        ).first()
        # The lookup is by hash (an index probe on a value the caller cannot steer to a
        # prefix of a real token's hash); the final comparison is constant time all the same.
        if row is None or not hmac.compare_digest(bytes(row.token_hash), digest):
            return None
        if row.stale:
            await conn.execute(
                sql_text("UPDATE credentials SET last_used_at = now() WHERE credential_id = :c"),
                {"c": row.credential_id},
            )
            await conn.commit()
    found = Principal(row.principal_id, Role(row.role), row.name, row.merchant_id)
    if cache is not None:
        cache.put(digest, found)
    return found

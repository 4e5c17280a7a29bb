"""Bearer tokens for merchants, auditors and operators; stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncConnection

from core.ids import new_token
from core.storage import Database, sql_text

__all__ = ["Principal", "Role", "TokenCache", "authenticate", "issue_token"]


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
    """Create a principal and return its token (shown once)."""
    token = new_token(_PREFIX[role])
    await conn.execute(
        sql_text(
            "INSERT INTO principals (principal_id, role, name, merchant_id, token_hash)"
            " VALUES (:id, :r, :n, :m, :h)"
        ),
        {"id": principal_id, "r": role.value, "n": name, "m": merchant_id, "h": _hash(token)},
    )
    return token


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
                    "SELECT principal_id, role, name, merchant_id, token_hash FROM principals"
                    " WHERE token_hash = :h"
                ),
                {"h": digest},
            )
        ).first()
    # The lookup is by hash (an index probe on a value the caller cannot steer to a prefix
    # of a real token's hash); the final comparison is constant time all the same.
    if row is None or not hmac.compare_digest(bytes(row.token_hash), digest):
        return None
    found = Principal(row.principal_id, Role(row.role), row.name, row.merchant_id)
    if cache is not None:
        cache.put(digest, found)
    return found

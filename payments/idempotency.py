"""Idempotency keys: the stored request hash and response of each (merchant, key).

The key row is written first in the unit of work, with the response the request will get.
A concurrent request with the same key waits on the primary key, then finds the row: the
same body hash gets the stored response, another body is a conflict (like Mojaloop's
duplicate check: same id and hash is a resend, same id and another hash is a modification).

The body holds the payer's VPA (and device): a plain hash of it, stored, would give the VPA
to anyone holding the rest of the row and a list of candidate VPAs. So the row stores the
hash keyed (:func:`stored_hash`, HMAC under the pseudonym key); rows from before keep their
plain hash, which still matches.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from core.crypto import MasterKey
from core.errors import IdempotencyConflict
from core.storage import sql_text

__all__ = ["STORED", "STORED_RAW", "claim_key", "replay", "stored_hash", "stored_response"]


def stored_hash(master: MasterKey, request_hash: bytes) -> bytes:
    """What the key's row holds for a request's hash: keyed (see the module)."""
    return master.digest(request_hash, "idempotency")


async def claim_key(
    conn: AsyncConnection,
    *,
    merchant_id: str,
    key: str,
    request_hash: bytes,
    transaction_id: str,
    response: dict[str, Any],
    master: MasterKey,
    status: int = 202,
) -> bool:
    """Record the key with its response; False if the key was already used."""
    row = (
        await conn.execute(
            sql_text(
                "INSERT INTO idempotency_keys (merchant_id, idempotency_key, request_hash,"
                " transaction_id, response_status, response_body)"
                " VALUES (:m, :k, :h, :t, :s, CAST(:b AS jsonb))"
                " ON CONFLICT DO NOTHING RETURNING 1"
            ),
            {
                "m": merchant_id,
                "k": key,
                "h": stored_hash(master, request_hash),
                "t": transaction_id,
                "s": status,
                "b": orjson.dumps(response).decode(),
            },
        )
    ).first()
    return row is not None


async def stored_response(
    conn: AsyncConnection, *, merchant_id: str, key: str, request_hash: bytes, master: MasterKey
) -> tuple[int, dict[str, Any]]:
    """The first response under this key, or :class:`IdempotencyConflict` for another body."""
    row = (await conn.execute(sql_text(STORED), {"m": merchant_id, "k": key})).one()
    status = int(row.response_status)
    return replay(bytes(row.request_hash), status, row.response_body, request_hash, master)


# The stored key, by merchant and key: with named parameters, and as the gateway's
# asyncpg path binds them (by position).
_STORED = (
    "SELECT request_hash, response_status, response_body FROM idempotency_keys"
    " WHERE merchant_id = {} AND idempotency_key = {}"
)
STORED = _STORED.format(":m", ":k")
STORED_RAW = _STORED.format("$1", "$2")


def replay(
    stored: bytes,
    status: int,
    body: dict[str, Any] | str,
    request_hash: bytes,
    master: MasterKey,
) -> tuple[int, dict[str, Any]]:
    """What a request under a used key gets: the first response for the same body (a
    resend), :class:`IdempotencyConflict` for another (a modification). ``stored``: the
    row's hash, keyed, or plain for a row from before keyed hashes."""
    same = hmac.compare_digest(stored, stored_hash(master, request_hash))
    if not (same or hmac.compare_digest(stored, request_hash)):
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return status, dict(orjson.loads(body) if isinstance(body, str) else body)

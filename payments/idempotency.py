"""Idempotency keys: the stored request hash and response of each (merchant, key).

The key row is written first in the unit of work, with the response the request will get.
A concurrent request with the same key waits on the primary key, then finds the row: the
same body hash gets the stored response, another body is a conflict (like Mojaloop's
duplicate check: same id and hash is a resend, same id and another hash is a modification).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import IdempotencyConflict
from core.storage import sql_text

__all__ = ["claim_key", "stored_response"]


async def claim_key(
    conn: AsyncConnection,
    *,
    merchant_id: str,
    key: str,
    request_hash: bytes,
    transaction_id: str,
    response: dict[str, Any],
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
                "h": request_hash,
                "t": transaction_id,
                "s": status,
                "b": orjson.dumps(response).decode(),
            },
        )
    ).first()
    return row is not None


async def stored_response(
    conn: AsyncConnection, *, merchant_id: str, key: str, request_hash: bytes
) -> tuple[int, dict[str, Any]]:
    """The first response under this key, or :class:`IdempotencyConflict` for another body."""
    row = (
        await conn.execute(
            sql_text(
                "SELECT request_hash, response_status, response_body FROM idempotency_keys"
                " WHERE merchant_id = :m AND idempotency_key = :k"
            ),
            {"m": merchant_id, "k": key},
        )
    ).one()
    if bytes(row.request_hash) != request_hash:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return int(row.response_status), dict(row.response_body)

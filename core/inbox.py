"""Inbox: one (consumer, event_id) row written in the same transaction as a consumer's effect.

A redelivered event finds its row and changes nothing. Two concurrent deliveries of one
event (a Kafka rebalance) serialise on the primary key: the second insert waits for the
first transaction, then finds the row.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from core.storage import sql_text

__all__ = ["already_processed_many", "claim", "claim_many"]

_PROCESSED = sql_text(
    "SELECT event_id FROM inbox WHERE consumer = :c AND event_id = ANY(CAST(:es AS uuid[]))"
)
_CLAIM_MANY = sql_text(
    "INSERT INTO inbox (consumer, event_id)"
    " SELECT :c, e FROM unnest(CAST(:es AS uuid[])) AS e"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)


async def claim(conn: AsyncConnection, consumer: str, event_id: uuid.UUID) -> bool:
    """Record that ``consumer`` handles ``event_id`` in this transaction; False if done before."""
    row = (
        await conn.execute(
            sql_text(
                "INSERT INTO inbox (consumer, event_id) VALUES (:c, :e)"
                " ON CONFLICT DO NOTHING RETURNING 1"
            ),
            {"c": consumer, "e": event_id},
        )
    ).first()
    return row is not None


async def claim_many(
    conn: AsyncConnection, consumer: str, event_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """:func:`claim` for a batch, in one statement: the ids claimed now (the others were
    handled before, or are being handled by a concurrent delivery that this one waits for)."""
    if not event_ids:
        return set()
    rows = await conn.execute(_CLAIM_MANY, {"c": consumer, "es": [str(e) for e in event_ids]})
    return {uuid.UUID(str(r[0])) for r in rows}


async def already_processed_many(
    conn: AsyncConnection, consumer: str, event_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """Those of ``event_ids`` that ``consumer`` handled before, in one statement."""
    if not event_ids:
        return set()
    rows = await conn.execute(_PROCESSED, {"c": consumer, "es": [str(e) for e in event_ids]})
    return {uuid.UUID(str(r[0])) for r in rows}

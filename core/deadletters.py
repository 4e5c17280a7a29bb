"""Dead letters kept in PostgreSQL (the memory bus's sink; Kafka adds a topic)."""

from __future__ import annotations

from core.bus.base import DeadLetter
from core.storage import Database, sql_text

__all__ = ["TableDeadLetters"]


class TableDeadLetters:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def dead_letter(self, letter: DeadLetter) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                sql_text(
                    "INSERT INTO dead_letters"
                    " (consumer, topic, event_id, event_type, raw, reason, attempts)"
                    " VALUES (:c, :t, :e, :et, :raw, :r, :a)"
                ),
                {
                    "c": letter.consumer,
                    "t": letter.topic,
                    "e": letter.event_id,
                    "et": letter.event_type,
                    "raw": letter.raw,
                    "r": letter.reason,
                    "a": letter.attempts,
                },
            )

"""The switch's journal: the one outside source settlement reconciles against.

In production this is NPCI's raw settlement data; here it is the mock switch's own journal
table (``npci_transactions``), read through this port only.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from typing import Protocol

from sqlalchemy import text

from core.clock import IST
from core.storage import Database
from settlement.domain import ItemKind, JournalRow

__all__ = ["NpciJournal", "SwitchJournal"]


class SwitchJournal(Protocol):
    async def rows(self, business_date: date, references: Iterable[str]) -> list[JournalRow]:
        """The switch's rows for these references, plus every debit it made on that date."""
        ...


class NpciJournal:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def rows(self, business_date: date, references: Iterable[str]) -> list[JournalRow]:
        start = datetime.combine(business_date, time(), tzinfo=IST)
        end = start + timedelta(days=1)
        async with self._db.connection() as conn:
            result = await conn.execute(
                text(
                    "SELECT txn_id, kind, amount_paise, debited FROM npci_transactions"
                    " WHERE txn_id = ANY(:refs) OR (debited AND created_at >= :start"
                    " AND created_at < :end) ORDER BY txn_id"
                ),
                {"refs": list(references), "start": start, "end": end},
            )
            return [
                JournalRow(
                    r.txn_id,
                    ItemKind.REFUND if r.kind == "REFUND" else ItemKind.PAYMENT,
                    int(r.amount_paise),
                    bool(r.debited),
                )
                for r in result
            ]

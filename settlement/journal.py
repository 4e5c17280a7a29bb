"""The two records settlement reconciles against, each behind a port:

* the switch's journal — in production NPCI's raw settlement data; here the mock switch's
  own journal table (``npci_transactions``);
* the compliance ledger — every settled event must be in it (``ledger_entries`` holds the
  event ids in clear).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from typing import Protocol

from core.clock import IST
from core.storage import Database, sql_text
from settlement.domain import ItemKind, JournalRow

__all__ = ["ComplianceLedgerIndex", "LedgerIndex", "NpciJournal", "SwitchJournal"]


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
                sql_text(
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


class LedgerIndex(Protocol):
    async def missing(self, event_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The event ids that are not in the compliance ledger."""
        ...


class ComplianceLedgerIndex:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def missing(self, event_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        wanted = set(event_ids)
        async with self._db.connection() as conn:
            found = await conn.execute(
                sql_text("SELECT event_id FROM ledger_entries WHERE event_id = ANY(:ids)"),
                {"ids": list(wanted)},
            )
            return wanted - set(found.scalars())

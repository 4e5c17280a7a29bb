"""The two records settlement reconciles against, each behind a port:

* the switch's journal (:class:`SwitchJournal`) — in production NPCI's raw settlement data;
  here the switch's settlement data, asked through the switch port (the composition root
  wires it: ``api/switch_journal.py``), each debit on the date the switch shows it (a late
  success's on the date its debit showed);
* the compliance ledger — every settled event must be in it (``ledger_entries`` holds the
  event ids in clear).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date
from typing import Protocol

from core.storage import Database, sql_text
from settlement.domain import JournalRow

__all__ = ["ComplianceLedgerIndex", "LedgerIndex", "SwitchJournal"]


class SwitchJournal(Protocol):
    async def rows(self, business_date: date, references: Iterable[str]) -> list[JournalRow]:
        """The switch's rows for these references, plus every debit it made on that date."""
        ...


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

"""Settlement's switch journal (:class:`settlement.journal.SwitchJournal`) from the switch's
settlement data, asked through the switch port (:class:`payments.npci.switch.SettlementData`):
the in-process mock's, or over HTTP that of the switch at ``UPI_NPCI_URL``.

Here, in the composition root, because it joins two contexts' types: settlement never sees
the switch, and the switch never sees settlement. Nothing reads the simulator's tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

from payments.npci.switch import SettlementData
from settlement.domain import ItemKind, JournalRow

__all__ = ["SwitchSettlementJournal"]

# The switch's kinds of row; a reversal (of a payment's debit) reconciles as its payment did.
_KINDS = {"REFUND": ItemKind.REFUND, "CHARGEBACK": ItemKind.CHARGEBACK}


class SwitchSettlementJournal:
    def __init__(self, source: SettlementData) -> None:
        self._source = source

    async def rows(self, business_date: date, references: Iterable[str]) -> list[JournalRow]:
        found = await self._source.settlement_data(business_date, list(references))
        return [
            JournalRow(r.txn_id, _KINDS.get(r.kind, ItemKind.PAYMENT), r.amount_paise, r.debited)
            for r in found
        ]

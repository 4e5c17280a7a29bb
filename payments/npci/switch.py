"""The switch port: what the NPCI handler needs from NPCI, whatever carries it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.money import Paise

__all__ = ["PayRequest", "SwitchClient", "SwitchResult"]


@dataclass(frozen=True)
class PayRequest:
    txn_id: str
    payer_vpa: str
    payee_vpa: str
    amount_paise: Paise
    note: str | None = None


@dataclass(frozen=True)
class SwitchResult:
    txn_id: str
    response_code: str
    rrn: str | None
    payer_bank: str | None
    payee_bank: str | None
    known: bool = True  # False: check-status found no such transaction at the switch


class SwitchClient(Protocol):
    async def pay(self, request: PayRequest) -> SwitchResult:
        """ReqPay. Repeating a txn id never debits again: the switch answers the first result."""
        ...

    async def check_status(self, txn_id: str) -> SwitchResult:
        """ReqChkTxn. ``known=False`` when the switch never saw ``txn_id``."""
        ...

"""The switch port: what the NPCI handler needs from NPCI, whatever carries it.

Errors: :class:`~core.errors.SwitchTimeout` when no answer came within the leg timeout (the
request may or may not have been processed), :class:`~core.errors.SwitchError` when the
switch refused the request before processing it (safe to ask check-status, then resend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.money import Paise

__all__ = ["PayRequest", "RefundRequest", "ReversalResult", "SwitchClient", "SwitchResult"]


@dataclass(frozen=True)
class PayRequest:
    txn_id: str
    payer_vpa: str
    payee_vpa: str
    amount_paise: Paise
    note: str | None = None


@dataclass(frozen=True)
class RefundRequest:
    refund_id: str
    original_txn_id: str
    payer_vpa: str  # credited
    payee_vpa: str  # debited (the merchant)
    amount_paise: Paise


@dataclass(frozen=True)
class SwitchResult:
    txn_id: str
    response_code: str
    rrn: str | None
    payer_bank: str | None
    payee_bank: str | None
    known: bool = True  # False: check-status found no such transaction at the switch


@dataclass(frozen=True)
class ReversalResult:
    txn_id: str
    response_code: str  # "00" reversed, "21" nothing was debited, "96" failed: retry
    reversed: bool


class SwitchClient(Protocol):
    async def pay(self, request: PayRequest) -> SwitchResult:
        """ReqPay. Repeating a txn id never debits again: the switch answers the first result."""
        ...

    async def check_status(self, txn_id: str) -> SwitchResult:
        """ReqChkTxn. ``known=False`` when the switch never saw ``txn_id``; ``01`` while pending."""
        ...

    async def reverse(self, txn_id: str) -> ReversalResult:
        """Credit reversal of a deemed debit. Idempotent; voids a txn id the switch never saw."""
        ...

    async def refund(self, request: RefundRequest) -> SwitchResult:
        """Refund credit to the payer. Idempotent by refund id."""
        ...

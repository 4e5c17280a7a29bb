"""The switch port: what the NPCI handler needs from NPCI, whatever carries it.

Errors: :class:`~core.errors.SwitchTimeout` when no answer came within the leg timeout (the
request may or may not have been processed), :class:`~core.errors.SwitchError` when the
switch refused the request before processing it (safe to ask check-status, then resend).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from core.money import Paise

__all__ = [
    "DisputeNotice",
    "PayRequest",
    "RefundRequest",
    "ReversalResult",
    "SettlementData",
    "SettlementRecord",
    "SwitchClient",
    "SwitchResult",
]


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


@dataclass(frozen=True)
class DisputeNotice:
    """A payer's complaint as the switch's dispute feed (UDIR) reports it.

    ``status``: ``OPEN`` (the merchant's side must answer by ``respond_by``), ``ACCEPTED``
    (a chargeback: by the merchant, or deemed when nobody answered in time), ``CONTESTED``
    (evidence given, the switch decides), then ``WON`` or ``LOST`` (a chargeback) at
    ``decided_at``. ``changed_at``: when the feed last showed a change of it."""

    dispute_id: str
    txn_id: str
    amount_paise: Paise
    reason: str
    raised_at: datetime
    respond_by: datetime
    status: str
    changed_at: datetime
    payer_bank: str
    payee_bank: str
    decided_at: datetime | None = None


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

    async def dispute_updates(self, since: datetime, limit: int = 500) -> list[DisputeNotice]:
        """The disputes raised or decided after ``since`` (up to now), oldest change first.
        Reading it again from an earlier ``since`` repeats changes: callers apply them
        idempotently."""
        ...

    async def answer_dispute(
        self,
        dispute_id: str,
        *,
        accept: bool,
        evidence: str | None = None,
        documents: Sequence[str] = (),
    ) -> DisputeNotice:
        """Accept (a chargeback now) or contest with evidence an ``OPEN`` dispute. Idempotent:
        a dispute already answered is returned as it stands, whatever is asked."""
        ...


@dataclass(frozen=True)
class SettlementRecord:
    """One row of the switch's settlement data (in production NPCI's raw settlement data):
    what the switch holds for a transaction it saw."""

    txn_id: str  # our txn id, a refund id, or a dispute id (a chargeback)
    kind: str  # PAY, REFUND or CHARGEBACK
    amount_paise: Paise
    debited: bool  # the money moved, as of the end of the date asked for
    payer_vpa: str


class SettlementData(Protocol):
    async def settlement_data(
        self, business_date: date, references: Sequence[str]
    ) -> list[SettlementRecord]:
        """The switch's rows for ``references``, plus every debit it shows on
        ``business_date`` (IST), ordered by txn id. A debit counts on the date the switch
        shows it: a late success's on the date its debit showed, and not before."""
        ...

"""The payment lifecycle (SPEC §4), pure: no database, bus or web imports.

    INITIATED ──► PENDING_VERIFICATION ──► SUBMITTED ──► SUCCESS
        │                 │                    │  └────► FAILED
        │                 └──► FAILED          └──► DEEMED ──► SUCCESS | FAILED | REVERSED
        ├──► SUBMITTED
        ├──► BLOCKED
        └──► FAILED

Final statuses never change. Transitions are explicit; anything else is
:class:`~core.errors.InvalidTransition`. Every transition is recorded (append-only history).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from core.errors import InvalidTransition
from core.money import Paise

__all__ = [
    "FINAL_STATUSES",
    "Payment",
    "PaymentStatus",
    "StatusChange",
    "can_transition",
]


class PaymentStatus(StrEnum):
    INITIATED = "INITIATED"
    PENDING_VERIFICATION = "PENDING_VERIFICATION"
    SUBMITTED = "SUBMITTED"
    DEEMED = "DEEMED"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    BLOCKED = "BLOCKED"
    REVERSED = "REVERSED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {PaymentStatus.SUCCESS, PaymentStatus.FAILED, PaymentStatus.BLOCKED, PaymentStatus.REVERSED}
)

_S = PaymentStatus
_ALLOWED: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    _S.INITIATED: frozenset({_S.PENDING_VERIFICATION, _S.SUBMITTED, _S.BLOCKED, _S.FAILED}),
    _S.PENDING_VERIFICATION: frozenset({_S.SUBMITTED, _S.FAILED, _S.BLOCKED}),
    _S.SUBMITTED: frozenset({_S.DEEMED, _S.SUCCESS, _S.FAILED}),
    _S.DEEMED: frozenset({_S.SUCCESS, _S.FAILED, _S.REVERSED}),
    _S.SUCCESS: frozenset(),
    _S.FAILED: frozenset(),
    _S.BLOCKED: frozenset(),
    _S.REVERSED: frozenset(),
}


def can_transition(current: PaymentStatus, target: PaymentStatus) -> bool:
    return target in _ALLOWED[current]


@dataclass(frozen=True)
class StatusChange:
    status: PaymentStatus
    at: datetime
    response_code: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Payment:
    transaction_id: str
    merchant_id: str
    merchant_order_id: str
    # The payer's VPA, opened from its sealed column (payments/repository.py); "" once the
    # retention purged it (payments/retention.py). Never in a repr.
    payer_vpa: str = field(repr=False)
    payee_vpa: str
    amount_paise: Paise
    status: PaymentStatus
    created_at: datetime
    updated_at: datetime
    currency: str = "INR"
    note: str | None = None
    mcc: str = "0000"
    response_code: str | None = None
    rrn: str | None = None
    payer_bank: str | None = None
    payee_bank: str | None = None
    completed_at: datetime | None = None
    # The fraud decision as the merchant sees it: {decision, score, reasons}.
    fraud: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    history: tuple[StatusChange, ...] = field(default=())
    # The bus partition key of every event of this payment: the payer's keyed pseudonym
    # (core.crypto.MasterKey.partition_key), fixed at initiation, so all of one payer's
    # events go through one partition, in order, without the VPA on the bus.
    partition_key: str = field(default="", repr=False)

    @classmethod
    def initiate(
        cls,
        *,
        transaction_id: str,
        merchant_id: str,
        merchant_order_id: str,
        payer_vpa: str,
        payee_vpa: str,
        amount_paise: Paise,
        at: datetime,
        note: str | None = None,
        mcc: str = "0000",
        partition_key: str = "",
    ) -> Payment:
        if amount_paise < 1:
            raise ValueError("amount_paise must be at least 1")
        return cls(
            transaction_id=transaction_id,
            merchant_id=merchant_id,
            merchant_order_id=merchant_order_id,
            payer_vpa=payer_vpa,
            payee_vpa=payee_vpa,
            amount_paise=amount_paise,
            status=PaymentStatus.INITIATED,
            created_at=at,
            updated_at=at,
            note=note,
            mcc=mcc,
            history=(StatusChange(PaymentStatus.INITIATED, at),),
            partition_key=partition_key,
        )

    def transition(
        self,
        target: PaymentStatus,
        *,
        at: datetime,
        response_code: str | None = None,
        reason: str | None = None,
        rrn: str | None = None,
        payer_bank: str | None = None,
        payee_bank: str | None = None,
    ) -> Payment:
        if not can_transition(self.status, target):
            raise InvalidTransition(f"{self.transaction_id}: {self.status} -> {target} not allowed")
        change = StatusChange(target, at, response_code, reason)
        return replace(
            self,
            status=target,
            updated_at=at,
            response_code=response_code if response_code is not None else self.response_code,
            rrn=rrn if rrn is not None else self.rrn,
            payer_bank=payer_bank or self.payer_bank,
            payee_bank=payee_bank or self.payee_bank,
            completed_at=at if target.is_final else self.completed_at,
            history=(*self.history, change),
        )

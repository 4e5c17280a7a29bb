"""Request and response bodies of the HTTP API (separate from events and tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.money import WholePaise
from core.pii import Vpa
from payments.domain import Payment, PaymentStatus
from payments.limits import MCC_LIMITS_PAISE
from payments.views import payment_view

__all__ = [
    "CosignatureIn",
    "CreatePaymentRequest",
    "CreateRefundRequest",
    "DeviceIn",
    "PaymentAccepted",
    "PaymentList",
    "PaymentView",
    "RefundList",
    "RefundView",
]

ID_PATTERN = r"^[A-Za-z0-9_-]+$"
ORDER_ID_PATTERN = r"^[A-Za-z0-9._:/-]+$"
# Free text: anything printable; NUL can never be stored in PostgreSQL text.
Text = Annotated[str, Field(pattern=r"^[^\x00]*$")]

# No category allows more; the merchant's own limit is checked by the service.
_MAX_ANY_LIMIT = max(MCC_LIMITS_PAISE.values())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceIn(_Strict):
    id: Text = Field(min_length=1, max_length=128)
    ip: Text | None = Field(default=None, max_length=45)
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    os: Text | None = Field(default=None, max_length=64)
    app_version: Text | None = Field(default=None, max_length=32)
    emulator: bool | None = None
    rooted: bool | None = None


class CreatePaymentRequest(_Strict):
    payer_vpa: Vpa = Field(description="Payer's UPI address (local-part@handle)")
    payee_vpa: Vpa | None = Field(
        default=None,
        description="Defaults to the merchant's VPA; otherwise one of the VPAs registered to"
        " the merchant (upi-engine merchant add-vpa), else 422 payee_not_allowed",
    )
    amount_paise: Annotated[int, Field(ge=1, le=_MAX_ANY_LIMIT), WholePaise] = Field(
        description="Integer paise, 1 .. the merchant category's per-transaction limit"
        " (₹1,00,000 = 10000000 by default; ₹2 or 5 lakh for the 2025 categories, else"
        " 422 amount_over_limit)"
    )
    currency: Literal["INR"] = "INR"
    merchant_order_id: str = Field(min_length=1, max_length=64, pattern=ORDER_ID_PATTERN)
    note: Text | None = Field(default=None, max_length=100)
    device: DeviceIn | None = None


class PaymentAccepted(BaseModel):
    transaction_id: str
    status: PaymentStatus
    merchant_order_id: str
    amount_paise: int
    created_at: datetime


class FraudView(BaseModel):
    decision: Literal["ALLOW", "STEP_UP", "BLOCK"]
    score: float
    reasons: list[str]


class PaymentView(BaseModel):
    transaction_id: str
    merchant_order_id: str
    status: PaymentStatus
    amount_paise: int
    currency: str
    payer_vpa: str = Field(description="Masked")
    payee_vpa: str = Field(description="Masked")
    response_code: str | None = Field(description="UPI response code; 00 = success")
    response_description: str | None
    rrn: str | None
    fraud: FraudView | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @classmethod
    def of(cls, payment: Payment) -> PaymentView:
        return cls.model_validate(payment_view(payment))


class PaymentList(BaseModel):
    items: list[PaymentView]
    next_after: str | None = Field(description="The next page: pass it as ``after``")
    next_cursor: str | None = Field(description="The same as ``next_after`` (older name)")


class VerificationRequest(_Strict):
    otp: str = Field(
        pattern=r"^[0-9]{4,8}$",
        description="The payer's one-time password (sandbox: 123456)",
    )


# Why a merchant gives money back (SPEC §4).
RefundReason = Literal["customer_request", "duplicate", "fraudulent", "other"]


class CreateRefundRequest(_Strict):
    amount_paise: Annotated[int, Field(ge=1, le=_MAX_ANY_LIMIT), WholePaise] = Field(
        description="Integer paise; all refunds of a payment never exceed its amount"
    )
    reason: RefundReason | None = Field(
        default=None,
        description="Why: customer_request, duplicate, fraudulent or other (optional)",
    )
    note: Text | None = Field(default=None, max_length=100)


class RefundView(BaseModel):
    refund_id: str
    transaction_id: str
    amount_paise: int
    reason: RefundReason | None = None
    note: str | None = None
    status: Literal["PENDING", "SUCCESS", "FAILED"]
    response_code: str | None
    rrn: str | None
    created_at: datetime
    completed_at: datetime | None


class RefundList(BaseModel):
    items: list[RefundView]
    next_after: str | None = Field(
        default=None, description="The next page: pass it as ``after``; null: the last page"
    )


DisputeStatusName = Literal["OPEN", "ACCEPTED", "CONTESTED", "WON", "LOST"]


class ContestDisputeRequest(_Strict):
    """The merchant's evidence: free text (sealed at rest) and references to documents
    (an invoice number, a delivery tracking id, a URL of the merchant's own store)."""

    evidence: Text = Field(min_length=1, max_length=20_000)
    documents: list[Annotated[Text, Field(min_length=1, max_length=512)]] = Field(
        default_factory=list, max_length=20
    )


class DisputeView(BaseModel):
    dispute_id: str
    transaction_id: str
    amount_paise: int
    reason: str
    status: DisputeStatusName
    auto_accepted: bool
    raised_at: datetime
    respond_by: datetime
    answered_at: datetime | None
    resolved_at: datetime | None
    documents: list[str]
    chargeback: bool


class DisputeList(BaseModel):
    items: list[DisputeView]
    next_after: str | None = None


class CosignatureIn(_Strict):
    """A witness's cosignature of a checkpoint (SPEC §6)."""

    height: Annotated[int, Field(ge=1)]
    witness_key_id: Annotated[str, Field(pattern=r"^wk-[0-9a-f]{16}$")]
    cosigned_at: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9T:.Z+-]+$")]
    signature: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9+/=]+$")]

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
        " (₹1,00,000 = 10000000 by default)"
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
    next_cursor: str | None


class VerificationRequest(_Strict):
    otp: str = Field(
        pattern=r"^[0-9]{4,8}$",
        description="The payer's one-time password (sandbox: 123456)",
    )


class CreateRefundRequest(_Strict):
    amount_paise: Annotated[int, Field(ge=1, le=_MAX_ANY_LIMIT), WholePaise] = Field(
        description="Integer paise; all refunds of a payment never exceed its amount"
    )
    note: Text | None = Field(default=None, max_length=100)


class RefundView(BaseModel):
    refund_id: str
    transaction_id: str
    amount_paise: int
    status: Literal["PENDING", "SUCCESS", "FAILED"]
    response_code: str | None
    rrn: str | None
    created_at: datetime
    completed_at: datetime | None


class RefundList(BaseModel):
    items: list[RefundView]

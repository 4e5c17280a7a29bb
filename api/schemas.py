"""Request and response bodies of the HTTP API (separate from events and tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.pii import Vpa, mask_vpa
from payments.domain import Payment, PaymentStatus
from payments.npci.codes import describe

__all__ = ["CreatePaymentRequest", "DeviceIn", "PaymentAccepted", "PaymentList", "PaymentView"]

# ₹1,00,000: NPCI's general per-transaction UPI limit.
DEFAULT_LIMIT_PAISE = 10_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceIn(_Strict):
    id: str = Field(min_length=1, max_length=128)
    ip: str | None = Field(default=None, max_length=45)
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    os: str | None = Field(default=None, max_length=64)
    app_version: str | None = Field(default=None, max_length=32)


class CreatePaymentRequest(_Strict):
    payer_vpa: Vpa = Field(description="Payer's UPI address (local-part@handle)")
    payee_vpa: Vpa | None = Field(default=None, description="Defaults to the merchant's VPA")
    amount_paise: Annotated[int, Field(strict=True, ge=1, le=DEFAULT_LIMIT_PAISE)]
    currency: Literal["INR"] = "INR"
    merchant_order_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:/-]+$")
    note: str | None = Field(default=None, max_length=100)
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
        return cls(
            transaction_id=payment.transaction_id,
            merchant_order_id=payment.merchant_order_id,
            status=payment.status,
            amount_paise=payment.amount_paise,
            currency=payment.currency,
            payer_vpa=mask_vpa(payment.payer_vpa),
            payee_vpa=mask_vpa(payment.payee_vpa),
            response_code=payment.response_code,
            response_description=describe(payment.response_code) if payment.response_code else None,
            rrn=payment.rrn,
            fraud=None,
            created_at=payment.created_at,
            updated_at=payment.updated_at,
            completed_at=payment.completed_at,
        )


class PaymentList(BaseModel):
    items: list[PaymentView]
    next_cursor: str | None

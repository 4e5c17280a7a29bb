"""How a payment looks to its merchant (API responses and webhook bodies): VPAs masked."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.pii import mask_vpa
from payments.domain import Payment
from payments.npci.codes import describe

__all__ = ["payment_view"]


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


def payment_view(payment: Payment) -> dict[str, Any]:
    return {
        "transaction_id": payment.transaction_id,
        "merchant_order_id": payment.merchant_order_id,
        "status": payment.status.value,
        "amount_paise": payment.amount_paise,
        "currency": payment.currency,
        "payer_vpa": mask_vpa(payment.payer_vpa),
        "payee_vpa": mask_vpa(payment.payee_vpa),
        "response_code": payment.response_code,
        "response_description": describe(payment.response_code) if payment.response_code else None,
        "rrn": payment.rrn,
        "fraud": payment.fraud,
        "created_at": _iso(payment.created_at),
        "updated_at": _iso(payment.updated_at),
        "completed_at": _iso(payment.completed_at),
    }

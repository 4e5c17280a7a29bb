"""Gateway use cases: initiate a payment, read payments.

``initiate_payment`` is one unit of work: the idempotency key row (:mod:`payments.idempotency`),
the payment, its first history row and the ``PaymentInitiated`` outbox row commit together or
not at all. A refused request (a payee that is not one of the merchant's registered VPAs, an
amount over the limit, a payer over its day) raises inside it, so the key is released with
everything else and the merchant can send the corrected request under the same key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import IST, Clock, business_date
from core.errors import LimitExceeded, NotFound, PayeeNotAllowed
from core.events import DeviceInfo, Envelope, PaymentInitiated
from core.ids import new_transaction_id
from core.metrics import PAYMENTS_INITIATED
from core.outbox import append_to_outbox
from core.pii import Vpa, partition_key_for
from core.storage import Database, sql_text
from payments import repository
from payments.domain import Payment, PaymentStatus
from payments.idempotency import claim_key, stored_response
from payments.limits import PayerDailyLimits, per_transaction_limit
from payments.merchants import load_collecting_merchant, load_merchant

__all__ = [
    "InitiatePayment",
    "InitiationResult",
    "PaymentLimits",
    "get_payment",
    "initiate_payment",
    "list_payments",
    "request_hash",
]


@dataclass(frozen=True)
class InitiatePayment:
    """Command: collect ``amount_paise`` from ``payer_vpa`` for a merchant."""

    merchant_id: str
    idempotency_key: str
    request_hash: bytes
    payer_vpa: Vpa
    payee_vpa: Vpa | None  # None: the merchant's own VPA
    amount_paise: int
    merchant_order_id: str
    note: str | None = None
    device: DeviceInfo | None = None
    currency: str = "INR"


@dataclass(frozen=True)
class InitiationResult:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def request_hash(body: dict[str, Any]) -> bytes:
    """Hash of the canonical request (sorted keys): the same body always hashes the same."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


@dataclass(frozen=True)
class PaymentLimits:
    mcc_overrides: dict[str, int] = field(default_factory=dict)
    payer_daily: PayerDailyLimits = field(default_factory=PayerDailyLimits)


async def _check_payer_day(
    conn: AsyncConnection, payer: str, amount: int, now: datetime, limits: PayerDailyLimits
) -> None:
    """Per payer per IST day. The advisory lock serialises one payer's initiations, so two
    concurrent requests cannot both squeeze under the limit."""
    await conn.execute(
        sql_text("SELECT pg_advisory_xact_lock(hashtextextended(:p, 0))"), {"p": "payer:" + payer}
    )
    day_start = datetime.combine(business_date(now), time(), tzinfo=IST)
    count, total = (
        await conn.execute(
            sql_text(
                "SELECT count(*), coalesce(sum(amount_paise), 0) FROM payments"
                " WHERE payer_vpa = :p AND created_at >= :start"
                " AND status NOT IN ('FAILED', 'BLOCKED', 'REVERSED')"
            ),
            {"p": payer, "start": day_start},
        )
    ).one()
    if count + 1 > limits.max_count:
        raise LimitExceeded(
            "payer_daily_count_exceeded",
            f"the payer has reached {limits.max_count} payments today (IST)",
        )
    if total + amount > limits.max_amount_paise:
        raise LimitExceeded(
            "payer_daily_amount_exceeded",
            f"this payment would take the payer past {limits.max_amount_paise} paise today (IST)",
        )


async def initiate_payment(
    db: Database, cmd: InitiatePayment, clock: Clock, limits: PaymentLimits | None = None
) -> InitiationResult:
    limits = limits or PaymentLimits()
    now = clock.now()
    transaction_id = new_transaction_id()
    body = {
        "transaction_id": transaction_id,
        "status": PaymentStatus.INITIATED.value,
        "merchant_order_id": cmd.merchant_order_id,
        "amount_paise": cmd.amount_paise,
        "created_at": now.isoformat().replace("+00:00", "Z"),
    }
    async with db.transaction() as conn:
        fresh = await claim_key(
            conn,
            merchant_id=cmd.merchant_id,
            key=cmd.idempotency_key,
            request_hash=cmd.request_hash,
            transaction_id=transaction_id,
            response=body,
        )
        if not fresh:
            status, stored = await stored_response(
                conn,
                merchant_id=cmd.merchant_id,
                key=cmd.idempotency_key,
                request_hash=cmd.request_hash,
            )
            return InitiationResult(status, stored, replayed=True)
        if cmd.payee_vpa is None:  # the merchant's own VPA, registered with it
            merchant = await load_merchant(conn, cmd.merchant_id)
            if merchant is None:
                raise NotFound(f"no merchant {cmd.merchant_id}")
        else:
            collecting = await load_collecting_merchant(conn, cmd.merchant_id, cmd.payee_vpa)
            if collecting is None:
                raise NotFound(f"no merchant {cmd.merchant_id}")
            if not collecting.payee_registered:
                raise PayeeNotAllowed(
                    f"payee_vpa {cmd.payee_vpa} is not one of this merchant's registered VPAs;"
                    " omit payee_vpa to collect into the merchant's own VPA, or have the"
                    " operator register it (upi-engine merchant add-vpa)"
                )
            merchant = collecting.merchant
        limit = per_transaction_limit(merchant.mcc, limits.mcc_overrides)
        if cmd.amount_paise > limit:
            raise LimitExceeded(
                "amount_over_limit",
                f"amount_paise exceeds the per-transaction limit of {limit} for MCC {merchant.mcc}",
            )
        await _check_payer_day(conn, cmd.payer_vpa.value, cmd.amount_paise, now, limits.payer_daily)
        payee = cmd.payee_vpa or Vpa(merchant.vpa)
        payment = Payment.initiate(
            transaction_id=transaction_id,
            merchant_id=cmd.merchant_id,
            merchant_order_id=cmd.merchant_order_id,
            payer_vpa=cmd.payer_vpa.value,
            payee_vpa=payee.value,
            amount_paise=cmd.amount_paise,
            at=now,
            note=cmd.note,
            mcc=merchant.mcc,
        )
        device = cmd.device.model_dump(mode="json", exclude_none=True) if cmd.device else None
        await repository.insert_payment(conn, payment, device)
        event = PaymentInitiated(
            transaction_id=payment.transaction_id,
            merchant_id=payment.merchant_id,
            merchant_order_id=payment.merchant_order_id,
            payer_vpa=cmd.payer_vpa,
            payee_vpa=payee,
            amount_paise=payment.amount_paise,
            note=payment.note,
            device=cmd.device,
            initiated_at=now,
        )
        await append_to_outbox(
            conn,
            [
                Envelope.wrap(
                    event, partition_key=partition_key_for(cmd.payer_vpa.value), occurred_at=now
                )
            ],
        )
    PAYMENTS_INITIATED.inc()
    return InitiationResult(202, body, replayed=False)


async def get_payment(db: Database, merchant_id: str, transaction_id: str) -> Payment:
    """A merchant's own payment; another merchant's is :class:`NotFound`, like a missing one."""
    async with db.connection() as conn:
        payment = await repository.load_payment(conn, transaction_id)
    if payment is None or payment.merchant_id != merchant_id:
        raise NotFound(f"no payment {transaction_id}")
    return payment


async def list_payments(
    db: Database,
    merchant_id: str,
    merchant_order_id: str,
    *,
    limit: int = 50,
    after: str | None = None,
) -> list[Payment]:
    async with db.connection() as conn:
        return await repository.list_payments_by_order(
            conn, merchant_id, merchant_order_id, limit=limit, after_transaction_id=after
        )

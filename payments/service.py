"""Gateway use cases: initiate a payment, read payments.

``initiate_payment`` is one unit of work: the idempotency key row (:mod:`payments.idempotency`),
the payment, its first history row and the ``PaymentInitiated`` outbox row commit together or
not at all. A refused request (a payee that is not one of the merchant's registered VPAs, an
amount over the limit, a payer over its day or its category's day) raises inside it, so the
key is released with everything else and the merchant can send the corrected request under
the same key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

import asyncpg
import orjson

from core.clock import IST, Clock, business_date
from core.crypto import MasterKey
from core.errors import NotFound, PayeeNotAllowed
from core.events import DeviceInfo, PaymentInitiated
from core.ids import new_transaction_id
from core.metrics import PAYMENTS_INITIATED
from core.outbox import append_to_outbox_raw
from core.pii import Vpa
from core.sealing import wrap_sealed
from core.storage import Database
from payments import repository
from payments.domain import Payment, PaymentStatus
from payments.idempotency import STORED_RAW, replay, stored_hash
from payments.limits import PayerDay, PaymentLimits, check_amount, check_payer_day
from payments.merchants import Merchant

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
    # The payer's keyed pseudonym (core.crypto.MasterKey.partition_key): the bus key of
    # every event of the payment.
    partition_key: str
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


# The first statement of an initiation, one round trip on the hot path: claim the
# idempotency key (as :func:`payments.idempotency.claim_key`), take the payer's advisory lock
# (it serialises one payer's initiations, so two concurrent requests cannot both squeeze
# under the day's limits, the general ones or a category's: the next statement, which reads
# them, sees every initiation of the payer committed before it, in every category), and read
# the merchant with whether the payee asked for is one of its registered VPAs
# (``merchant_vpas``, :mod:`payments.merchants`).
_OPEN = (
    "WITH k AS (INSERT INTO idempotency_keys (merchant_id, idempotency_key, request_hash,"
    " transaction_id, response_status, response_body)"
    " VALUES ($1, $2, $3, $4, 202, CAST($5 AS jsonb)) ON CONFLICT DO NOTHING RETURNING 1),"
    " lk AS (SELECT pg_advisory_xact_lock(hashtextextended($6, 0)))"
    " SELECT (SELECT count(*) FROM k) AS fresh, (SELECT count(*) FROM lk) AS locked,"
    " m.merchant_id, m.name, m.vpa, m.mcc, m.webhook_url,"
    " EXISTS (SELECT 1 FROM merchant_vpas v WHERE v.vpa = $7"
    " AND v.merchant_id = m.merchant_id) AS payee_registered"
    " FROM (SELECT 1) AS one LEFT JOIN merchants m ON m.merchant_id = $1"
)
# The payer's IST day by MCC (a handful of rows: the day's count is limited); which MCCs
# make a category's day and which the general one is :mod:`payments.limits`' to say.
_PAYER_DAY = (
    "SELECT mcc, count(*) AS n, coalesce(sum(amount_paise), 0) AS total FROM payments"
    " WHERE payer_key = $1 AND created_at >= $2"
    " AND status NOT IN ('FAILED', 'BLOCKED', 'REVERSED') GROUP BY mcc"
)


async def _check_payer_day(
    conn: asyncpg.Connection,
    payer: bytes,
    mcc: str,
    amount: int,
    now: datetime,
    limits: PaymentLimits,
) -> None:
    """Per payer per IST day, general and by category (the payer's lock is held: :data:`_OPEN`)."""
    day_start = datetime.combine(business_date(now), time(), tzinfo=IST)
    rows = await conn.fetch(_PAYER_DAY, payer, day_start)
    day = {r["mcc"]: PayerDay(r["n"], r["total"]) for r in rows}
    check_payer_day(day, mcc, amount, limits)


async def initiate_payment(
    db: Database,
    cmd: InitiatePayment,
    clock: Clock,
    limits: PaymentLimits | None = None,
    *,
    master: MasterKey,
) -> InitiationResult:
    """Four statements: :data:`_OPEN`, the payer's day, the payment with its first history
    row, the outbox row. ``master`` seals the payer's PII in the row and in the event, and
    keys the payer's pseudonym (its lock and its day are found by it)."""
    if not cmd.partition_key:
        raise ValueError("InitiatePayment needs the payer's partition key")
    limits = limits or PaymentLimits()
    now = clock.now()
    transaction_id = new_transaction_id()
    payer = repository.payer_key(master, cmd.payer_vpa.value)
    body = {
        "transaction_id": transaction_id,
        "status": PaymentStatus.INITIATED.value,
        "merchant_order_id": cmd.merchant_order_id,
        "amount_paise": cmd.amount_paise,
        "created_at": now.isoformat().replace("+00:00", "Z"),
    }
    async with db.raw_transaction() as conn:
        opened = await conn.fetchrow(
            _OPEN,
            cmd.merchant_id,
            cmd.idempotency_key,
            stored_hash(master, cmd.request_hash),
            transaction_id,
            orjson.dumps(body).decode(),
            "payer:" + payer.hex(),
            cmd.payee_vpa.value if cmd.payee_vpa else None,
        )
        assert opened is not None
        if not opened["fresh"]:
            row = await conn.fetchrow(STORED_RAW, cmd.merchant_id, cmd.idempotency_key)
            assert row is not None
            status, stored = replay(
                row["request_hash"],
                row["response_status"],
                row["response_body"],
                cmd.request_hash,
                master,
            )
            return InitiationResult(status, stored, replayed=True)
        if opened["merchant_id"] is None:
            raise NotFound(f"no merchant {cmd.merchant_id}")
        merchant = Merchant(
            *(opened[c] for c in ("merchant_id", "name", "vpa", "mcc", "webhook_url"))
        )
        if cmd.payee_vpa is not None and not opened["payee_registered"]:
            raise PayeeNotAllowed(
                f"payee_vpa {cmd.payee_vpa} is not one of this merchant's registered VPAs;"
                " omit payee_vpa to collect into the merchant's own VPA, or have the"
                " operator register it (upi-engine merchant add-vpa)"
            )
        check_amount(merchant.mcc, cmd.amount_paise, limits)
        await _check_payer_day(conn, payer, merchant.mcc, cmd.amount_paise, now, limits)
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
            partition_key=cmd.partition_key,
        )
        device = cmd.device.model_dump(mode="json", exclude_none=True) if cmd.device else None
        await repository.insert_payment(conn, payment, device, master)
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
        await append_to_outbox_raw(
            conn,
            [wrap_sealed(event, master, partition_key=payment.partition_key, occurred_at=now)],
        )
    PAYMENTS_INITIATED.inc()
    return InitiationResult(202, body, replayed=False)


async def get_payment(
    db: Database, merchant_id: str, transaction_id: str, master: MasterKey
) -> Payment:
    """A merchant's own payment; another merchant's is :class:`NotFound`, like a missing one."""
    async with db.connection() as conn:
        payment = await repository.load_payment(conn, transaction_id, master)
    if payment is None or payment.merchant_id != merchant_id:
        raise NotFound(f"no payment {transaction_id}")
    return payment


async def list_payments(
    db: Database,
    merchant_id: str,
    merchant_order_id: str,
    master: MasterKey,
    *,
    limit: int = 50,
    after: str | None = None,
) -> list[Payment]:
    async with db.connection() as conn:
        return await repository.list_payments_by_order(
            conn, merchant_id, merchant_order_id, master, limit=limit, after_transaction_id=after
        )

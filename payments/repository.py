"""Payment storage. Rows are not domain objects: this module translates between them.

The payer's PII is sealed at rest (SPEC §1): the VPA and the device, with its IP and
location, are one value in ``payer_pii`` (:meth:`core.crypto.MasterKey.seal_pii`, bound to
the transaction id), and the payer is found by ``payer_key``, the VPA's keyed pseudonym.
Loading a payment opens its payer under the same master key."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from core.crypto import MasterKey
from core.storage import sql_text
from payments.domain import Payment, PaymentStatus

__all__ = [
    "insert_payment",
    "list_payments_by_order",
    "load_payment",
    "load_payments",
    "open_payer",
    "payer_aad",
    "payer_key",
    "schedule_check",
    "seal_payer",
    "to_payment",
]

_COLUMNS = (
    "transaction_id, merchant_id, merchant_order_id, payer_vpa, payer_pii, payee_vpa,"
    " amount_paise,"
    " currency, note, mcc, status, response_code, rrn, payer_bank, payee_bank, fraud,"
    " created_at, updated_at, completed_at, partition_key"
)


def payer_aad(transaction_id: str) -> bytes:
    """What a payment's sealed payer is bound to: its row (a copy elsewhere does not open)."""
    return b"payments|" + transaction_id.encode()


def payer_key(master: MasterKey, payer_vpa: str) -> bytes:
    """The payer's keyed pseudonym, by which the payer's payments are found (their day)."""
    return master.pseudonym(payer_vpa, "payer")


def seal_payer(
    master: MasterKey, transaction_id: str, payer_vpa: str, device: dict[str, Any] | None
) -> bytes:
    """A payment's ``payer_pii``: its payer's VPA and device, sealed to its row."""
    return master.seal_pii({"payer_vpa": payer_vpa, "device": device}, payer_aad(transaction_id))


def open_payer(master: MasterKey, row: Any) -> str:
    """The payer's VPA of a row: opened from ``payer_pii``; from ``payer_vpa`` for a row
    written before sealing and not sealed yet; "" once the retention purged it."""
    if row.payer_pii is not None:
        return str(master.open_pii(row.payer_pii, payer_aad(row.transaction_id))["payer_vpa"])
    return row.payer_vpa or ""


def to_payment(row: Row[Any], master: MasterKey) -> Payment:
    return Payment(
        transaction_id=row.transaction_id,
        merchant_id=row.merchant_id,
        merchant_order_id=row.merchant_order_id,
        payer_vpa=open_payer(master, row),
        payee_vpa=row.payee_vpa,
        amount_paise=int(row.amount_paise),
        currency=row.currency,
        note=row.note,
        mcc=row.mcc,
        status=PaymentStatus(row.status),
        response_code=row.response_code,
        rrn=row.rrn,
        payer_bank=row.payer_bank,
        payee_bank=row.payee_bank,
        created_at=row.created_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
        fraud=row.fraud,
        partition_key=row.partition_key,
    )


_INSERT_PAYMENT = (
    "WITH p AS (INSERT INTO payments (transaction_id, merchant_id, merchant_order_id,"
    " payer_key, payer_pii, payee_vpa, amount_paise, currency, note, mcc, status,"
    " created_at, updated_at, partition_key)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)"
    " RETURNING transaction_id)"
    " INSERT INTO payment_status_history (transaction_id, seq, status, at)"
    " SELECT transaction_id, 1, $11, $12 FROM p"
)


async def insert_payment(
    conn: asyncpg.Connection,
    payment: Payment,
    device: dict[str, Any] | None,
    master: MasterKey,
) -> None:
    """The payment and its first history row, in one statement (on the gateway's asyncpg
    connection: ``Database.raw_transaction``); the payer and the device sealed."""
    await conn.execute(
        _INSERT_PAYMENT,
        payment.transaction_id,
        payment.merchant_id,
        payment.merchant_order_id,
        payer_key(master, payment.payer_vpa),
        seal_payer(master, payment.transaction_id, payment.payer_vpa, device),
        payment.payee_vpa,
        payment.amount_paise,
        payment.currency,
        payment.note,
        payment.mcc,
        payment.status.value,
        payment.created_at,
        payment.partition_key,
    )


async def load_payment(
    conn: AsyncConnection, transaction_id: str, master: MasterKey, *, for_update: bool = False
) -> Payment | None:
    sql = f"SELECT {_COLUMNS} FROM payments WHERE transaction_id = :t"
    if for_update:
        sql += " FOR UPDATE"
    row = (await conn.execute(sql_text(sql), {"t": transaction_id})).first()
    return to_payment(row, master) if row is not None else None


async def load_payments(
    conn: AsyncConnection,
    transaction_ids: Sequence[str],
    master: MasterKey,
    *,
    for_update: bool = False,
) -> dict[str, Payment]:
    """The payments of ``transaction_ids`` that exist, by id, in one statement (rows locked
    in id order with ``for_update``, so that two batches cannot deadlock)."""
    sql = (
        f"SELECT {_COLUMNS} FROM payments WHERE transaction_id = ANY(CAST(:ts AS text[]))"
        " ORDER BY transaction_id"
    )
    if for_update:
        sql += " FOR UPDATE"
    rows = (await conn.execute(sql_text(sql), {"ts": sorted(set(transaction_ids))})).all()
    return {row.transaction_id: to_payment(row, master) for row in rows}


async def list_payments_by_order(
    conn: AsyncConnection,
    merchant_id: str,
    merchant_order_id: str,
    master: MasterKey,
    *,
    limit: int,
    after_transaction_id: str | None = None,
) -> list[Payment]:
    sql = f"SELECT {_COLUMNS} FROM payments WHERE merchant_id = :m AND merchant_order_id = :o"
    params: dict[str, Any] = {"m": merchant_id, "o": merchant_order_id, "n": limit}
    if after_transaction_id:
        sql += " AND transaction_id > :after"
        params["after"] = after_transaction_id
    sql += " ORDER BY transaction_id LIMIT :n"
    return [to_payment(r, master) for r in (await conn.execute(sql_text(sql), params)).all()]


async def schedule_check(conn: AsyncConnection, transaction_id: str, at: datetime) -> None:
    await conn.execute(
        sql_text("UPDATE payments SET next_check_at = :at WHERE transaction_id = :t"),
        {"at": at, "t": transaction_id},
    )

"""Refunds: partial or full, idempotent, never more in total than the payment.

``request_refund`` (gateway) locks the payment row, checks it is ``SUCCESS`` and that the
refunds not failed plus this one stay within its amount, and records the refund with a
``RefundInitiated`` outbox row in one transaction. :class:`RefundHandler` (switch role)
sends the credit to the payer through the switch — idempotent by refund id, so a retry is
always safe — and records ``RefundSucceeded`` or ``RefundFailed``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from core.bus.base import Subscription
from core.clock import Clock
from core.crypto import MasterKey
from core.errors import NotFound, PoisonMessage, RefundRejected
from core.events import (
    CATALOGUE,
    Envelope,
    Event,
    RefundFailed,
    RefundInitiated,
    RefundSucceeded,
    Topic,
)
from core.ids import new_event_id
from core.inbox import claim
from core.outbox import append_to_outbox
from core.storage import Database, sql_text
from payments import repository
from payments.domain import PaymentStatus
from payments.idempotency import claim_key, stored_response
from payments.npci.codes import Outcome, describe, outcome_of
from payments.npci.switch import RefundRequest, SwitchClient

__all__ = ["Refund", "RefundHandler", "list_refunds", "request_refund"]


# Why a merchant refunds (SPEC §4); stored as given, None when not given.
REFUND_REASONS = frozenset({"customer_request", "duplicate", "fraudulent", "other"})


@dataclass(frozen=True)
class Refund:
    refund_id: str
    transaction_id: str
    amount_paise: int
    status: str
    response_code: str | None
    rrn: str | None
    created_at: datetime
    completed_at: datetime | None
    reason: str | None = None
    note: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "refund_id": self.refund_id,
            "transaction_id": self.transaction_id,
            "amount_paise": self.amount_paise,
            "reason": self.reason,
            "note": self.note,
            "status": self.status,
            "response_code": self.response_code,
            "rrn": self.rrn,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "completed_at": self.completed_at.isoformat().replace("+00:00", "Z")
            if self.completed_at
            else None,
        }


_REFUND_COLUMNS = (
    "refund_id, transaction_id, amount_paise, status, response_code, rrn, created_at,"
    " completed_at, refund_reason, note"
)


def _refund(row: Any) -> Refund:
    return Refund(
        row.refund_id,
        row.transaction_id,
        int(row.amount_paise),
        row.status,
        row.response_code,
        row.rrn,
        row.created_at,
        row.completed_at,
        row.refund_reason,
        row.note,
    )


async def request_refund(
    db: Database,
    *,
    merchant_id: str,
    transaction_id: str,
    amount_paise: int,
    idempotency_key: str,
    request_hash: bytes,
    clock: Clock,
    master: MasterKey,
    reason: str | None = None,
    note: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Returns (refund view, replayed)."""
    if reason is not None and reason not in REFUND_REASONS:
        raise ValueError(f"unknown refund reason {reason!r}")  # the API validated it
    now = clock.now()
    refund_id = "RFD" + new_event_id().hex
    scoped_key = f"refund:{transaction_id}:{idempotency_key}"
    async with db.transaction() as conn:
        payment = await repository.load_payment(conn, transaction_id, master, for_update=True)
        if payment is None or payment.merchant_id != merchant_id:
            raise NotFound(f"no payment {transaction_id}")
        view = Refund(
            refund_id, transaction_id, amount_paise, "PENDING", None, None, now, None, reason, note
        )
        fresh = await claim_key(
            conn,
            merchant_id=merchant_id,
            key=scoped_key,
            request_hash=request_hash,
            transaction_id=transaction_id,
            response=view.view(),
            master=master,
        )
        if not fresh:
            _, stored = await stored_response(
                conn,
                merchant_id=merchant_id,
                key=scoped_key,
                request_hash=request_hash,
                master=master,
            )
            return stored, True
        if payment.status is not PaymentStatus.SUCCESS:
            raise RefundRejected(
                "payment_not_refundable", f"only SUCCESS payments are refundable ({payment.status})"
            )
        if not payment.payer_vpa:
            raise RefundRejected(
                "payment_not_refundable",
                "the payer's details were purged at the end of their retention period"
                " (UPI_PII_RETENTION_DAYS): the switch cannot be told whom to credit",
            )
        refunded = (
            await conn.execute(
                sql_text(
                    "SELECT (SELECT coalesce(sum(amount_paise), 0) FROM refunds"
                    " WHERE transaction_id = :t AND status <> 'FAILED')"
                    # A disputed amount goes back by the chargeback, unless the merchant wins.
                    " + (SELECT coalesce(sum(amount_paise), 0) FROM disputes"
                    " WHERE transaction_id = :t AND status <> 'WON')"
                ),
                {"t": transaction_id},
            )
        ).scalar_one()
        if refunded + amount_paise > payment.amount_paise:
            raise RefundRejected(
                "refund_exceeds_payment",
                f"{refunded} of {payment.amount_paise} paise already refunded, in flight"
                " or disputed",
            )
        await conn.execute(
            sql_text(
                "INSERT INTO refunds (refund_id, transaction_id, merchant_id, amount_paise,"
                " status, created_at, refund_reason, note)"
                " VALUES (:r, :t, :m, :a, 'PENDING', :at, :why, :note)"
            ),
            {
                "r": refund_id,
                "t": transaction_id,
                "m": merchant_id,
                "a": amount_paise,
                "at": now,
                "why": reason,
                "note": note,
            },
        )
        event = RefundInitiated(
            transaction_id=transaction_id,
            merchant_id=merchant_id,
            refund_id=refund_id,
            amount_paise=amount_paise,
            initiated_at=now,
        )
        key = payment.partition_key
        await append_to_outbox(conn, [Envelope.wrap(event, partition_key=key, occurred_at=now)])
    return view.view(), False


async def list_refunds(
    db: Database,
    merchant_id: str,
    transaction_id: str,
    master: MasterKey,
    *,
    limit: int = 50,
    after: str | None = None,
) -> list[Refund]:
    """At most ``limit`` refunds of the payment, oldest first, those after the refund
    ``after`` (a keyset on (created_at, refund_id); an ``after`` not of this payment: an
    empty page)."""
    async with db.connection() as conn:
        payment = await repository.load_payment(conn, transaction_id, master)
        if payment is None or payment.merchant_id != merchant_id:
            raise NotFound(f"no payment {transaction_id}")
        rows = await conn.execute(
            sql_text(
                f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE transaction_id = :t"
                " AND (CAST(:after AS text) IS NULL OR (created_at, refund_id) >"
                " (SELECT created_at, refund_id FROM refunds"
                " WHERE refund_id = :after AND transaction_id = :t))"
                " ORDER BY created_at, refund_id LIMIT :n"
            ),
            {"t": transaction_id, "after": after, "n": limit},
        )
        return [_refund(r) for r in rows]


class RefundHandler:
    """Sends refund credits through the switch (switch role)."""

    consumer = "refund-handler"

    def __init__(
        self,
        db: Database,
        switch: SwitchClient,
        clock: Clock,
        timeout_s: float = 15.0,
        *,
        master: MasterKey,
    ) -> None:
        """``master``: opens the payer of the payment refunded (the switch credits it)."""
        self._db = db
        self._master = master
        self._switch = switch
        self._clock = clock
        self._timeout = timeout_s

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=self.handle,
            event_types=frozenset({RefundInitiated.name}),
        )

    async def handle(self, envelope: Envelope) -> None:
        event = CATALOGUE.decode_as(envelope, RefundInitiated)
        async with self._db.connection() as conn:
            status = (
                await conn.execute(
                    sql_text("SELECT status FROM refunds WHERE refund_id = :r"),
                    {"r": event.refund_id},
                )
            ).scalar_one_or_none()
            payment = await repository.load_payment(conn, event.transaction_id, self._master)
        if status is None or payment is None:
            raise PoisonMessage(f"RefundInitiated for unknown refund {event.refund_id}")
        if status != "PENDING":
            return
        # Idempotent by refund id at the switch: on a timeout the delivery is retried.
        result = await asyncio.wait_for(
            self._switch.refund(
                RefundRequest(
                    refund_id=event.refund_id,
                    original_txn_id=event.transaction_id,
                    payer_vpa=payment.payer_vpa,
                    payee_vpa=payment.payee_vpa,
                    amount_paise=event.amount_paise,
                )
            ),
            self._timeout,
        )
        now = self._clock.now()
        ok = result.response_code == "00"
        if not ok and outcome_of(result.response_code) is not Outcome.FAILED:
            raise TimeoutError(f"refund {event.refund_id} pending at the switch")
        async with self._db.transaction() as conn:
            if not await claim(conn, self.consumer, envelope.event_id):
                return
            updated = await _complete(conn, event.refund_id, result.response_code, result.rrn, now)
            if not updated:
                return
            outcome: Event
            if ok:
                outcome = RefundSucceeded(
                    transaction_id=event.transaction_id,
                    merchant_id=event.merchant_id,
                    refund_id=event.refund_id,
                    amount_paise=event.amount_paise,
                    response_code=result.response_code,
                    rrn=result.rrn or "",
                    payer_bank=result.payer_bank or "UNKNOWN",
                    payee_bank=result.payee_bank or "UNKNOWN",
                    completed_at=now,
                )
            else:
                outcome = RefundFailed(
                    transaction_id=event.transaction_id,
                    merchant_id=event.merchant_id,
                    refund_id=event.refund_id,
                    amount_paise=event.amount_paise,
                    response_code=result.response_code,
                    reason=describe(result.response_code),
                    completed_at=now,
                )
            await append_to_outbox(
                conn,
                [
                    Envelope.wrap(
                        outcome,
                        partition_key=envelope.partition_key,
                        occurred_at=now,
                        causation_id=envelope.event_id,
                    )
                ],
            )


async def _complete(
    conn: AsyncConnection, refund_id: str, code: str, rrn: str | None, at: datetime
) -> bool:
    row = (
        await conn.execute(
            sql_text(
                "UPDATE refunds SET status = :s, response_code = :c, rrn = :rrn, reason = :why,"
                " completed_at = :at WHERE refund_id = :r AND status = 'PENDING' RETURNING 1"
            ),
            {
                "s": "SUCCESS" if code == "00" else "FAILED",
                "c": code,
                "rrn": rrn,
                "why": None if code == "00" else describe(code),
                "at": at,
                "r": refund_id,
            },
        )
    ).first()
    return row is not None

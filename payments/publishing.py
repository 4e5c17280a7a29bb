"""How the payments context puts its events in the outbox: keyed by the payer (per-payer
order on every bus), caused by the event being handled, if any; and how a status change is
recorded with the event that tells it. One payment at a time; batches use
:class:`payments.changes.PaymentChanges` directly (these functions are that, for one)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.crypto import MasterKey
from core.events import Envelope, Event, PaymentFailed
from payments.changes import PaymentChanges, wrap
from payments.domain import Payment
from payments.npci.codes import describe

__all__ = ["emit", "failed_event", "finish", "wrap"]


async def emit(
    conn: AsyncConnection,
    event: Event,
    clock: Clock,
    cause: Envelope | None,
    partition_key: str,
    master: MasterKey | None = None,
) -> None:
    """Append one event to this transaction's outbox (``partition_key``: its payment's;
    ``master`` seals its PII, if it has any)."""
    changes = PaymentChanges(clock, master=master)
    changes.emit(event, cause, partition_key)
    await changes.flush(conn)


async def finish(
    conn: AsyncConnection,
    before: Payment,
    after: Payment,
    event: Event,
    clock: Clock,
    cause: Envelope | None,
    next_check_at: datetime | None = None,
    master: MasterKey | None = None,
) -> None:
    """Persist one transition with the event that announces it (and count final ones)."""
    changes = PaymentChanges(clock, master=master)
    changes.transition(before, after, event, cause, next_check_at=next_check_at)
    await changes.flush(conn)


def failed_event(payment: Payment, code: str, rrn: str | None, at: datetime) -> PaymentFailed:
    return PaymentFailed(
        transaction_id=payment.transaction_id,
        merchant_id=payment.merchant_id,
        amount_paise=payment.amount_paise,
        response_code=code,
        rrn=rrn,
        completed_at=at,
        reason=describe(code),
    )

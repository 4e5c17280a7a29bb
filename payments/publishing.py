"""How the payments context puts its events in the outbox: keyed by the payer (per-payer
order on every bus), caused by the event being handled, if any; and how a status change is
recorded with the event that tells it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.events import Envelope, Event, PaymentFailed
from core.metrics import PAYMENTS_FINAL
from core.outbox import append_to_outbox
from core.pii import partition_key_for
from payments import repository
from payments.domain import Payment
from payments.npci.codes import describe

__all__ = ["emit", "failed_event", "finish", "wrap"]


def wrap(event: Event, clock: Clock, cause: Envelope | None, payer_vpa: str) -> Envelope:
    return Envelope.wrap(
        event,
        partition_key=cause.partition_key if cause else partition_key_for(payer_vpa),
        occurred_at=clock.now(),
        causation_id=cause.event_id if cause else None,
    )


async def emit(
    conn: AsyncConnection, event: Event, clock: Clock, cause: Envelope | None, payer_vpa: str
) -> None:
    """Append one event to this transaction's outbox."""
    await append_to_outbox(conn, [wrap(event, clock, cause, payer_vpa)])


async def finish(
    conn: AsyncConnection,
    before: Payment,
    after: Payment,
    event: Event,
    clock: Clock,
    cause: Envelope | None,
    next_check_at: datetime | None = None,
) -> None:
    """Persist one transition with the event that announces it (and count final ones)."""
    await repository.save_transition(conn, before, after)
    if next_check_at is not None:
        await repository.schedule_check(conn, after.transaction_id, next_check_at)
    await emit(conn, event, clock, cause, before.payer_vpa)
    if after.status.is_final:
        PAYMENTS_FINAL.labels(after.status.value).inc()


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

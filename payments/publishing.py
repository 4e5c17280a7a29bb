"""How the payments context puts its events in the outbox: keyed by the payer (per-payer
order on every bus), caused by the event being handled, if any."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.events import Envelope, Event
from core.outbox import append_to_outbox
from core.pii import partition_key_for

__all__ = ["emit", "wrap"]


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

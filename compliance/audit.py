"""Auditor reads are themselves facts for the ledger: each one is an ``AuditAccessed``
event (who, what, when), written to the outbox like any other event."""

from __future__ import annotations

from core.clock import Clock
from core.events import AuditAccessed, Envelope
from core.outbox import append_to_outbox
from core.storage import Database

__all__ = ["record_audit_access"]


async def record_audit_access(
    db: Database,
    clock: Clock,
    *,
    principal_id: str,
    principal_name: str,
    action: str,
    resource: str,
) -> None:
    now = clock.now()
    event = AuditAccessed(
        principal_id=principal_id,
        principal_name=principal_name,
        action=action,
        resource=resource,
        accessed_at=now,
    )
    async with db.transaction() as conn:
        await append_to_outbox(
            conn, [Envelope.wrap(event, partition_key=f"auditor:{principal_id}", occurred_at=now)]
        )

"""What a unit of work does to payments, collected in memory and written set-based.

The handlers decide payment by payment (:mod:`payments.verification`,
:mod:`payments.npci_handler`) and record each decision here: a status transition with the
event that announces it, the fraud decision shown to the merchant, a step-up window, an
inbox claim. :meth:`PaymentChanges.flush` then writes all of it with one statement per
kind of row, whatever the number of payments: a batch of a hundred payments costs the
same handful of statements as one.

Order is kept: the events go to the outbox in the order they were recorded, and a payment
that changes twice in one unit of work gets its history rows in order and its row updated
once, from the status it had when it was read (the update checks it, so a concurrent
change is :class:`~core.errors.InvalidTransition`, never a lost update).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from core import tracing
from core.clock import Clock
from core.crypto import MasterKey
from core.errors import InvalidTransition
from core.events import Envelope, Event
from core.inbox import claim_many
from core.metrics import PAYMENTS_FINAL
from core.outbox import append_to_outbox
from core.sealing import seal_envelope
from core.storage import sql_text
from payments.domain import Payment, PaymentStatus

__all__ = ["PaymentChanges", "wrap"]

_UPDATE = sql_text(
    "UPDATE payments AS p SET status = u.s, response_code = u.c, rrn = u.rrn,"
    " payer_bank = u.pb, payee_bank = u.eb, updated_at = u.at, completed_at = u.done,"
    " next_check_at = CASE WHEN u.nc IS NULL THEN p.next_check_at ELSE u.nc END"
    " FROM unnest(CAST(:t AS text[]), CAST(:prev AS text[]), CAST(:s AS text[]),"
    " CAST(:c AS text[]), CAST(:rrn AS text[]), CAST(:pb AS text[]), CAST(:eb AS text[]),"
    " CAST(:at AS timestamptz[]), CAST(:done AS timestamptz[]), CAST(:nc AS timestamptz[]))"
    " AS u(t, prev, s, c, rrn, pb, eb, at, done, nc)"
    " WHERE p.transaction_id = u.t AND p.status = u.prev RETURNING p.transaction_id"
)
_HISTORY = sql_text(
    "INSERT INTO payment_status_history (transaction_id, seq, status, response_code, reason, at)"
    " SELECT u.t, COALESCE((SELECT max(h.seq) FROM payment_status_history AS h"
    " WHERE h.transaction_id = u.t), 0) + u.k, u.s, u.c, u.r, u.at"
    " FROM unnest(CAST(:t AS text[]), CAST(:k AS int[]), CAST(:s AS text[]),"
    " CAST(:c AS text[]), CAST(:r AS text[]), CAST(:at AS timestamptz[]))"
    " AS u(t, k, s, c, r, at)"
)
_FRAUD = sql_text(
    "UPDATE payments AS p SET fraud = u.f"
    " FROM unnest(CAST(:t AS text[]), CAST(:f AS jsonb[])) AS u(t, f)"
    " WHERE p.transaction_id = u.t"
)
_VERIFICATIONS = sql_text(
    "INSERT INTO payment_verifications (transaction_id, expires_at)"
    " SELECT * FROM unnest(CAST(:t AS text[]), CAST(:e AS timestamptz[]))"
    " ON CONFLICT DO NOTHING"
)


def wrap(
    event: Event,
    clock: Clock,
    cause: Envelope | None,
    partition_key: str,
    master: MasterKey | None = None,
) -> Envelope:
    """The envelope of a payments event: keyed by the payment's ``partition_key`` (the
    payer's keyed pseudonym: per-payer order on every bus), caused by the event being
    handled, if any, and in its trace (:func:`core.tracing.headers_for`). An event with
    PII fields has them sealed under ``master``'s field key (:mod:`core.sealing`); one
    without ``master`` is refused rather than published in clear."""
    if not (cause or partition_key):
        raise ValueError(f"{type(event).__name__}: no partition key")
    envelope = Envelope.wrap(
        event,
        partition_key=cause.partition_key if cause else partition_key,
        occurred_at=clock.now(),
        causation_id=cause.event_id if cause else None,
        headers=tracing.headers_for(cause),
    )
    if not event.pii:
        return envelope
    if master is None:
        raise ValueError(f"{type(event).__name__} carries PII: its publisher must seal it")
    return seal_envelope(envelope, master)


@dataclass
class _Row:
    """One payment's row as the unit of work leaves it."""

    read_status: PaymentStatus
    latest: Payment
    next_check_at: datetime | None = None
    changes: list[tuple[PaymentStatus, str | None, str | None, datetime]] = field(
        default_factory=list
    )


class PaymentChanges:
    def __init__(
        self, clock: Clock, consumer: str | None = None, *, master: MasterKey | None = None
    ) -> None:
        """``master``: seals the PII of the events recorded (needed for those that have)."""
        self._clock = clock
        self._consumer = consumer
        self._master = master
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._fraud: dict[str, dict[str, Any]] = {}
        self._verifications: dict[str, datetime] = {}
        self._events: list[Envelope] = []
        self._claims: list[uuid.UUID] = []
        self._final: list[PaymentStatus] = []

    def __bool__(self) -> bool:
        return bool(self._rows or self._fraud or self._verifications or self._events)

    def emit(self, event: Event, cause: Envelope | None, partition_key: str) -> None:
        self._events.append(wrap(event, self._clock, cause, partition_key, self._master))

    def transition(
        self,
        before: Payment,
        after: Payment,
        event: Event | None,
        cause: Envelope | None,
        *,
        next_check_at: datetime | None = None,
    ) -> Payment:
        """Record ``after`` (one transition past ``before``) with the event announcing it."""
        row = self._rows.get(before.transaction_id)
        if row is None:
            row = self._rows[before.transaction_id] = _Row(before.status, after)
        elif row.latest.status is not before.status:
            raise InvalidTransition(f"{before.transaction_id}: changed twice from one state")
        change = after.history[-1]
        row.latest = after
        row.changes.append((change.status, change.response_code, change.reason, change.at))
        if next_check_at is not None:
            row.next_check_at = next_check_at
        if event is not None:
            self.emit(event, cause, before.partition_key)
        if after.status.is_final:
            self._final.append(after.status)
        return after

    def record_fraud(self, transaction_id: str, fraud: dict[str, Any]) -> None:
        self._fraud[transaction_id] = fraud

    def open_verification(self, transaction_id: str, expires_at: datetime) -> None:
        self._verifications.setdefault(transaction_id, expires_at)

    def claim(self, event_id: uuid.UUID) -> None:
        """Mark an event handled by this unit's consumer (its inbox row)."""
        assert self._consumer is not None, "claims need the consumer's name"
        self._claims.append(event_id)

    async def flush(self, conn: AsyncConnection) -> None:
        """Write everything recorded, in the current transaction; then start afresh."""
        if self._fraud:
            await conn.execute(
                _FRAUD,
                {
                    "t": list(self._fraud),
                    "f": [orjson.dumps(f).decode() for f in self._fraud.values()],
                },
            )
        if self._rows:
            await self._write_rows(conn)
        if self._verifications:
            await conn.execute(
                _VERIFICATIONS,
                {"t": list(self._verifications), "e": list(self._verifications.values())},
            )
        if self._claims:
            assert self._consumer is not None
            await claim_many(conn, self._consumer, self._claims)
        await append_to_outbox(conn, self._events)
        for status in self._final:
            PAYMENTS_FINAL.labels(status.value).inc()
        self._reset()

    async def _write_rows(self, conn: AsyncConnection) -> None:
        rows = self._rows
        latest = [r.latest for r in rows.values()]
        updated = (
            await conn.execute(
                _UPDATE,
                {
                    "t": list(rows),
                    "prev": [r.read_status.value for r in rows.values()],
                    "s": [p.status.value for p in latest],
                    "c": [p.response_code for p in latest],
                    "rrn": [p.rrn for p in latest],
                    "pb": [p.payer_bank for p in latest],
                    "eb": [p.payee_bank for p in latest],
                    "at": [p.updated_at for p in latest],
                    "done": [p.completed_at for p in latest],
                    "nc": [r.next_check_at for r in rows.values()],
                },
            )
        ).all()
        if len(updated) != len(rows):
            missing = set(rows) - {r[0] for r in updated}
            raise InvalidTransition(f"{sorted(missing)[:3]}: status changed concurrently")
        history: dict[str, list[Any]] = {"t": [], "k": [], "s": [], "c": [], "r": [], "at": []}
        for txn, row in rows.items():
            for k, (status, code, reason, at) in enumerate(row.changes, start=1):
                history["t"].append(txn)
                history["k"].append(k)
                history["s"].append(status.value)
                history["c"].append(code)
                history["r"].append(reason)
                history["at"].append(at)
        await conn.execute(_HISTORY, history)

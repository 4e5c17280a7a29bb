"""Late successes: a payment the engine failed that the switch later reports as debited.

How one arises: the payer's bank debits, but the answer the switch gives is a failure
(``U30``, a bank's timeout turned into a decline) or a check-status says so; the engine
records ``FAILED``, final. Later the bank's success reaches the switch, whose books then
show a standing debit for the txn id. A real PSP learns of it from NPCI's settlement data,
not by asking: check-status on every failed payment is what NPCI's 2025 budget forbids.
So does this engine: settlement's close compares its records with the switch's journal
(:mod:`settlement.run`), classes such a payment ``late_success`` and publishes
:class:`~core.events.LateSuccessFound` with the close.

What happens then, here (switch role), never twice and crash-safe:

1. :meth:`LateSuccessReturner.handle` records the intent, ``late_success_returns`` row
   ``PENDING``, with the event's inbox row in one transaction, if the payment is ``FAILED``
   in our records (it is the source of truth; anything else is left alone). One row per
   payment: a redelivery, or the same debit found again, adds nothing.
2. :meth:`LateSuccessReturner.step` leases due ``PENDING`` rows and asks the switch for a
   credit reversal of the txn id (idempotent at the switch: a second call answers ``00``
   and moves nothing). ``00``: ``RETURNED`` with :class:`~core.events.LateSuccessReturned`
   in the outbox, one transaction, once (the status is checked under the row lock).
   ``21``: the switch holds no debit after all: ``NOT_DEBITED``, nothing to give back.
   ``96``, a timeout or a refusal: the lease expires and the next round asks again.

The payment's status never changes: it stays ``FAILED`` (a payment never reaches two final
statuses); the late debit and its return are facts of their own. No check-status is ever
spent on it: NPCI's reversal has no per-call limit (docs/npci.md).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date, timedelta

from core.bus.base import Subscription
from core.errors import SwitchError
from core.events import CATALOGUE, Envelope, LateSuccessFound, LateSuccessReturned, Topic
from core.inbox import claim
from core.pii import Vpa
from core.storage import sql_text
from payments import repository
from payments.domain import PaymentStatus
from payments.npci.banks import bank_of
from payments.npci_handler import SwitchPoller
from payments.publishing import emit

__all__ = ["DUE_RETURNS", "LateSuccessReturner"]

_log = logging.getLogger(__name__)

_RECORD_INTENT = sql_text(
    "INSERT INTO late_success_returns (transaction_id, amount_paise, found_on, status,"
    " next_attempt_at, created_at) VALUES (:t, :a, :d, 'PENDING', :now, :now)"
    " ON CONFLICT (transaction_id) DO NOTHING"
)
# The worker's scan, on its partial index (payments.0012).
DUE_RETURNS = sql_text(
    "SELECT transaction_id FROM late_success_returns WHERE status = 'PENDING'"
    " AND next_attempt_at <= :now ORDER BY next_attempt_at LIMIT :n FOR UPDATE SKIP LOCKED"
)
_LEASE = sql_text(
    "UPDATE late_success_returns SET next_attempt_at = :lease, attempts = attempts + 1"
    " WHERE transaction_id = ANY(CAST(:ts AS text[]))"
)
_COMPLETE = sql_text(
    "UPDATE late_success_returns SET status = :s, response_code = :c, completed_at = :at"
    " WHERE transaction_id = :t AND status = 'PENDING' RETURNING amount_paise"
)


class LateSuccessReturner(SwitchPoller):
    """Gives a late success back to its payer: consumes ``LateSuccessFound`` (records the
    intent) and sends the credit reversals (a polling worker, so that a bank that is down
    for days delays the return, never loses it)."""

    name = "late-success returner"
    consumer = "late-success"

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.SETTLEMENT.value,),
            handler=self.handle,
            event_types=frozenset({LateSuccessFound.name}),
        )

    async def handle(self, envelope: Envelope) -> None:
        event = CATALOGUE.decode_as(envelope, LateSuccessFound)
        txn = event.transaction_id
        async with self._db.transaction() as conn:
            if not await claim(conn, self.consumer, envelope.event_id):
                return
            payment = await repository.load_payment(conn, txn, self._master, for_update=True)
            if payment is None or payment.status is not PaymentStatus.FAILED:
                # Settlement's copy said FAILED; ours does not (or the id is not ours):
                # nothing of ours to give back. Reconciliation lists it for an operator.
                _log.warning(
                    "late success found for a payment that is not FAILED here (%s)",
                    payment.status if payment else "unknown",
                    extra={"transaction_id": txn},
                )
                return
            await conn.execute(
                _RECORD_INTENT,
                {
                    "t": txn,
                    "a": event.amount_paise,
                    "d": date.fromisoformat(event.business_date),
                    "now": self._clock.now(),
                },
            )

    async def step(self) -> int:
        """Send the reversal of every due late success once; returns how many were due."""
        now = self._clock.now()
        lease = now + timedelta(seconds=self.timings.lease_s)
        async with self._db.transaction() as conn:
            due = list((await conn.execute(DUE_RETURNS, {"now": now, "n": self._batch})).scalars())
            if due:
                await conn.execute(_LEASE, {"lease": lease, "ts": due})
        if due:
            await asyncio.gather(*(self._return(txn) for txn in due))
        return len(due)

    async def _return(self, txn: str) -> None:
        try:
            reversal = await asyncio.wait_for(
                self._switch.reverse(txn), self.timings.check_status_timeout_s
            )
        except (TimeoutError, SwitchError) as exc:
            _log.warning(
                "late success: reversal failed, will retry: %s", exc, extra={"transaction_id": txn}
            )
            return
        code = reversal.response_code
        if not reversal.reversed and code != "21":
            _log.warning("late success: reversal answered %s, will retry", code)
            return  # 96: the payer's bank cannot take it back now; the lease expires
        now = self._clock.now()
        async with self._db.transaction() as conn:
            status = "RETURNED" if reversal.reversed else "NOT_DEBITED"
            amount = (
                await conn.execute(_COMPLETE, {"s": status, "c": code, "at": now, "t": txn})
            ).scalar_one_or_none()
            if amount is None or not reversal.reversed:
                return  # done before (a lease that expired mid-call), or nothing debited
            payment = await repository.load_payment(conn, txn, self._master)
            assert payment is not None  # the row references it
            returned = LateSuccessReturned(
                transaction_id=txn,
                merchant_id=payment.merchant_id,
                amount_paise=int(amount),
                response_code=code,
                rrn=payment.rrn,
                payer_vpa=Vpa(payment.payer_vpa),
                payer_bank=bank_of(payment.payer_vpa) or "UNKNOWN",
                returned_at=now,
            )
            await emit(conn, returned, self._clock, None, payment.partition_key, self._master)
        _log.info("late success returned to the payer", extra={"transaction_id": txn})

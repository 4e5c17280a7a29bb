"""How the fraud decision steers a payment (SPEC §4), and the step-up verification.

A payment waits in ``INITIATED`` for its ``FraudAssessed``; :func:`apply_fraud_decision`
records the decision on it and:

* ``ALLOW``: the payment may go to the switch (the NPCI handler sends it at once);
* ``STEP_UP``: ``PENDING_VERIFICATION`` until the payer verifies
  (``POST /v1/payments/{id}/verification``, :func:`verify`) or the window (120 s) ends;
  verified, it goes to the switch (``PaymentVerified``); expired, :class:`VerificationExpirer`
  fails it with ``U69``; after too many wrong OTPs it fails with ``Z6``;
* ``BLOCK``: ``BLOCKED`` with ``U16`` (risk threshold exceeded), a final status.

The verification is a mock of the payer's PSP step-up (OTP or biometric): in this engine
the OTP is ``UPI_FRAUD_MOCK_OTP`` (``123456`` by default), documented for merchants.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.errors import NotFound, VerificationRejected
from core.events import (
    Envelope,
    FraudAssessed,
    FraudDecision,
    PaymentBlocked,
    PaymentVerificationRequired,
    PaymentVerified,
)
from core.polling import PollingWorker
from core.storage import Database, sql_text
from payments import repository
from payments.changes import PaymentChanges
from payments.domain import Payment, PaymentStatus
from payments.npci.codes import describe
from payments.publishing import emit, failed_event, finish

__all__ = [
    "BLOCKED_CODE",
    "EXPIRED_CODE",
    "TOO_MANY_TRIES_CODE",
    "VerificationExpirer",
    "VerificationPolicy",
    "apply_fraud_decision",
    "verify",
]

_log = logging.getLogger(__name__)
BLOCKED_CODE = "U16"
EXPIRED_CODE = "U69"
TOO_MANY_TRIES_CODE = "Z6"


@dataclass(frozen=True)
class VerificationPolicy:
    ttl_s: float = 120.0
    max_attempts: int = 3
    otp: str = "123456"


async def _fail(conn: AsyncConnection, payment: Payment, code: str, clock: Clock) -> None:
    now = clock.now()
    failed = payment.transition(
        PaymentStatus.FAILED, at=now, response_code=code, reason=describe(code)
    )
    await finish(conn, payment, failed, failed_event(payment, code, None, now), clock, None)


def apply_fraud_decision(
    changes: PaymentChanges,
    payment: Payment,
    assessed: FraudAssessed,
    envelope: Envelope,
    clock: Clock,
    policy: VerificationPolicy,
) -> Payment:
    """Record the decision on an ``INITIATED`` payment (row locked) and act on it. Returns
    the payment after: still ``INITIATED`` for ``ALLOW`` (the caller submits it)."""
    fraud = {
        "decision": assessed.decision.value,
        "score": assessed.score,
        "reasons": list(assessed.reasons),
    }
    changes.record_fraud(payment.transaction_id, fraud)
    now = clock.now()
    match assessed.decision:
        case FraudDecision.ALLOW:
            return payment
        case FraudDecision.STEP_UP:
            expires = now + timedelta(seconds=policy.ttl_s)
            after = payment.transition(
                PaymentStatus.PENDING_VERIFICATION, at=now, reason="fraud: step-up verification"
            )
            changes.open_verification(payment.transaction_id, expires)
            required = PaymentVerificationRequired(
                transaction_id=payment.transaction_id,
                merchant_id=payment.merchant_id,
                expires_at=expires,
            )
            return changes.transition(payment, after, required, envelope)
        case FraudDecision.BLOCK:
            reason = f"{describe(BLOCKED_CODE)}: {', '.join(assessed.reasons) or 'fraud'}"
            after = payment.transition(
                PaymentStatus.BLOCKED, at=now, response_code=BLOCKED_CODE, reason=reason[:200]
            )
            blocked = PaymentBlocked(
                transaction_id=payment.transaction_id,
                merchant_id=payment.merchant_id,
                amount_paise=payment.amount_paise,
                response_code=BLOCKED_CODE,
                completed_at=now,
                reasons=assessed.reasons,
            )
            return changes.transition(payment, after, blocked, envelope)


async def verify(
    db: Database,
    merchant_id: str,
    transaction_id: str,
    otp: str,
    clock: Clock,
    policy: VerificationPolicy,
) -> Payment:
    """The payer's answer to a step-up. A correct OTP publishes ``PaymentVerified`` (asked
    again, the same answer and nothing more); otherwise :class:`VerificationRejected` with a
    stable code, raised after the attempt is counted (and, at the last try, the payment
    failed) and committed."""
    rejection: VerificationRejected | None = None
    async with db.transaction() as conn:
        payment = await repository.load_payment(conn, transaction_id, for_update=True)
        if payment is None or payment.merchant_id != merchant_id:
            raise NotFound(f"no payment {transaction_id}")
        row = (
            await conn.execute(
                sql_text(
                    "SELECT expires_at, verified_at, attempts FROM payment_verifications"
                    " WHERE transaction_id = :t FOR UPDATE"
                ),
                {"t": transaction_id},
            )
        ).first()
        if row is None:
            raise VerificationRejected(
                "verification_not_required", "this payment was not stepped up"
            )
        if row.verified_at is not None:
            return payment
        if payment.status is not PaymentStatus.PENDING_VERIFICATION:
            raise VerificationRejected(
                "verification_closed",
                f"the payment is {payment.status.value}, no longer awaiting verification",
            )
        now = clock.now()
        if now >= row.expires_at:
            raise VerificationRejected("verification_expired", "the verification window has closed")
        if hmac.compare_digest(otp.encode(), policy.otp.encode()):
            await conn.execute(
                sql_text(
                    "UPDATE payment_verifications SET verified_at = :n WHERE transaction_id = :t"
                ),
                {"n": now, "t": transaction_id},
            )
            await emit(
                conn,
                PaymentVerified(
                    transaction_id=transaction_id, merchant_id=merchant_id, method="otp"
                ),
                clock,
                None,
                payment.payer_vpa,
            )
            return payment
        attempts = row.attempts + 1
        await conn.execute(
            sql_text("UPDATE payment_verifications SET attempts = :a WHERE transaction_id = :t"),
            {"a": attempts, "t": transaction_id},
        )
        left = policy.max_attempts - attempts
        if left <= 0:
            await _fail(conn, payment, TOO_MANY_TRIES_CODE, clock)
            rejection = VerificationRejected(
                "verification_failed", "wrong OTP and no tries left: the payment has failed"
            )
        else:
            rejection = VerificationRejected("verification_failed", f"wrong OTP; {left} tries left")
    raise rejection


# The payments awaiting verification are few, and found by their own partial index
# (payments.0007): expired windows of failed payments stay in payment_verifications.
EXPIRED_VERIFICATIONS = sql_text(
    "SELECT p.transaction_id FROM payments p"
    " JOIN payment_verifications v USING (transaction_id)"
    " WHERE p.status = 'PENDING_VERIFICATION' AND v.verified_at IS NULL"
    " AND v.expires_at <= :now ORDER BY v.expires_at LIMIT :n"
    " FOR UPDATE OF p, v SKIP LOCKED"
)


class VerificationExpirer(PollingWorker):
    """Fails stepped-up payments whose window closed unverified (``U69``)."""

    name = "verification expiry"

    def __init__(self, db: Database, clock: Clock, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self._db = db
        self._clock = clock

    async def expire_due(self, limit: int = 100) -> int:
        async with self._db.transaction() as conn:
            rows = (
                (await conn.execute(EXPIRED_VERIFICATIONS, {"now": self._clock.now(), "n": limit}))
                .scalars()
                .all()
            )
            for transaction_id in rows:
                payment = await repository.load_payment(conn, transaction_id)
                assert payment is not None
                await _fail(conn, payment, EXPIRED_CODE, self._clock)
        return len(rows)

    async def step(self) -> int:
        return await self.expire_due()

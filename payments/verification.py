"""How the fraud decision steers a payment (SPEC §4), and the step-up verification.

A payment waits in ``INITIATED`` for its ``FraudAssessed``; :func:`apply_fraud_decision`
records the decision on it and:

* ``ALLOW``: the payment may go to the switch (the NPCI handler sends it at once);
* ``STEP_UP``: ``PENDING_VERIFICATION`` until the payer verifies
  (``POST /v1/payments/{id}/verification``, :func:`verify`) or the window (120 s) ends;
  verified, it goes to the switch (``PaymentVerified``); expired, :class:`VerificationExpirer`
  fails it with ``U69``; after too many wrong OTPs it fails with ``Z6``;
* ``BLOCK``: ``BLOCKED`` with ``U16`` (risk threshold exceeded), a final status.

Who checks the payer's answer is a port, :class:`VerificationProvider`: it is told when a
challenge opens (:meth:`~VerificationProvider.start`, after the step-up is committed) and
asked whether a code is right (:meth:`~VerificationProvider.check`). Two adapters:

* :class:`MockOtpProvider`, the sandbox's: one static OTP, ``UPI_FRAUD_MOCK_OTP``
  (``123456`` by default), documented for merchants. Production refuses it at start.
* :class:`HttpVerificationProvider`, a step-up service at ``UPI_VERIFICATION_URL``
  (its contract in docs/security.md).

A provider that cannot give a verdict (a timeout, a refusal, an answer that is not one)
raises :class:`VerificationUnavailable`: the try is not counted and nothing changes, the
caller gets ``verification_unavailable`` (503) and may try again within the window. A
wrong code is only ever a verdict.

:func:`verify` does not hold the payment's row lock while a provider answers: it checks
the verification is open, asks the provider with no transaction open, then locks again,
checks again (the window may have closed, another try may have won) and records the verdict.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.crypto import MasterKey
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
    "HttpVerificationProvider",
    "MockOtpProvider",
    "VerificationExpirer",
    "VerificationPolicy",
    "VerificationProvider",
    "VerificationUnavailable",
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


class VerificationUnavailable(Exception):
    """The provider gave no verdict (unreachable, timed out, or answered something else)."""


class VerificationProvider(Protocol):
    """The payer's PSP step-up, as the engine sees it."""

    async def start(self, transaction_id: str, payer_vpa: str) -> None:
        """A challenge opened for this payment: send it to the payer (best effort: if it
        never arrives, the window closes and the payment fails with ``U69``)."""

    async def check(self, transaction_id: str, code: str) -> bool:
        """Whether ``code`` answers this payment's challenge; raises
        :class:`VerificationUnavailable` when there is no verdict."""
        ...

    async def close(self) -> None: ...


class MockOtpProvider:
    """The sandbox's provider: every challenge is answered by one static OTP."""

    def __init__(self, otp: str) -> None:
        self._otp = otp

    async def start(self, transaction_id: str, payer_vpa: str) -> None:
        return None  # nothing to send: the OTP is in the merchant guide

    async def check(self, transaction_id: str, code: str) -> bool:
        return hmac.compare_digest(code.encode(), self._otp.encode())

    async def close(self) -> None:
        return None


class HttpVerificationProvider:
    """A step-up service over HTTP (docs/security.md): ``POST {url}/challenges`` with
    ``{"transaction_id", "payer_vpa"}`` when a challenge opens, and ``POST {url}/checks``
    with ``{"transaction_id", "code"}``, answered ``200 {"verified": true|false}``. Any
    other answer, or none within the timeout, is no verdict."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=timeout_s, headers=headers, transport=transport
        )

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise VerificationUnavailable(f"{path}: {type(exc).__name__}") from None

    async def start(self, transaction_id: str, payer_vpa: str) -> None:
        answer = await self._post(
            "/challenges", {"transaction_id": transaction_id, "payer_vpa": payer_vpa}
        )
        if not answer.is_success:
            raise VerificationUnavailable(f"/challenges answered {answer.status_code}")

    async def check(self, transaction_id: str, code: str) -> bool:
        answer = await self._post("/checks", {"transaction_id": transaction_id, "code": code})
        if answer.status_code != 200:
            raise VerificationUnavailable(f"/checks answered {answer.status_code}")
        try:
            verdict = answer.json().get("verified")
        except (ValueError, AttributeError):
            verdict = None
        if not isinstance(verdict, bool):
            raise VerificationUnavailable("/checks answered no verdict")
        return verdict

    async def close(self) -> None:
        await self._client.aclose()


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


async def _open_verification(
    conn: AsyncConnection, merchant_id: str, transaction_id: str, clock: Clock, master: MasterKey
) -> tuple[Payment, Any]:
    """The payment (row locked) and its verification row (locked) when it may be answered
    now; ``row.verified_at`` set: verified already. Raises otherwise."""
    payment = await repository.load_payment(conn, transaction_id, master, for_update=True)
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
        raise VerificationRejected("verification_not_required", "this payment was not stepped up")
    if row.verified_at is not None:
        return payment, row
    if payment.status is not PaymentStatus.PENDING_VERIFICATION:
        raise VerificationRejected(
            "verification_closed",
            f"the payment is {payment.status.value}, no longer awaiting verification",
        )
    if clock.now() >= row.expires_at:
        raise VerificationRejected("verification_expired", "the verification window has closed")
    return payment, row


async def verify(
    db: Database,
    merchant_id: str,
    transaction_id: str,
    otp: str,
    clock: Clock,
    policy: VerificationPolicy,
    provider: VerificationProvider | None = None,
    *,
    master: MasterKey,
) -> Payment:
    """The payer's answer to a step-up, checked by ``provider`` (unset: the mock OTP of
    ``policy``). A right code publishes ``PaymentVerified`` (asked again, the same answer
    and nothing more); otherwise :class:`VerificationRejected` with a stable code, raised
    after the attempt is counted (and, at the last try, the payment failed) and committed.
    No verdict from the provider: ``verification_unavailable``, nothing counted."""
    checker = provider or MockOtpProvider(policy.otp)
    # The try is taken before the provider is asked, so that guesses sent side by side
    # can never be checked more often than the tries allow; given back when no verdict came.
    async with db.transaction() as conn:
        payment, row = await _open_verification(conn, merchant_id, transaction_id, clock, master)
        if row.verified_at is not None:
            return payment
        if row.attempts >= policy.max_attempts:
            raise VerificationRejected(
                "verification_failed", "no tries left: other answers are being checked"
            )
        attempts = row.attempts + 1
        await conn.execute(_SET_ATTEMPTS, {"a": attempts, "t": transaction_id})
    try:
        right = await checker.check(transaction_id, otp)
    except VerificationUnavailable as exc:
        _log.warning(
            "step-up provider gave no verdict: %s", exc, extra={"transaction_id": transaction_id}
        )
        async with db.transaction() as conn:
            await conn.execute(_GIVE_BACK_ATTEMPT, {"t": transaction_id})
        raise VerificationRejected(
            "verification_unavailable", "the verification provider did not answer; try again"
        ) from None
    rejection: VerificationRejected | None = None
    async with db.transaction() as conn:
        payment, row = await _open_verification(conn, merchant_id, transaction_id, clock, master)
        if row.verified_at is not None:
            return payment
        if right:
            await conn.execute(
                sql_text(
                    # A right code costs no try: the one taken for it is given back.
                    "UPDATE payment_verifications SET verified_at = :n,"
                    " attempts = greatest(attempts - 1, 0) WHERE transaction_id = :t"
                ),
                {"n": clock.now(), "t": transaction_id},
            )
            await emit(
                conn,
                PaymentVerified(
                    transaction_id=transaction_id, merchant_id=merchant_id, method="otp"
                ),
                clock,
                None,
                payment.partition_key,
            )
            return payment
        left = policy.max_attempts - attempts
        if left <= 0:
            await _fail(conn, payment, TOO_MANY_TRIES_CODE, clock)
            rejection = VerificationRejected(
                "verification_failed", "wrong OTP and no tries left: the payment has failed"
            )
        else:
            rejection = VerificationRejected("verification_failed", f"wrong OTP; {left} tries left")
    raise rejection


_SET_ATTEMPTS = sql_text("UPDATE payment_verifications SET attempts = :a WHERE transaction_id = :t")
_GIVE_BACK_ATTEMPT = sql_text(
    "UPDATE payment_verifications SET attempts = greatest(attempts - 1, 0)"
    " WHERE transaction_id = :t AND verified_at IS NULL"
)


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

    def __init__(
        self, db: Database, clock: Clock, interval_s: float = 1.0, *, master: MasterKey
    ) -> None:
        super().__init__(interval_s)
        self._db = db
        self._clock = clock
        self._master = master

    async def expire_due(self, limit: int = 100) -> int:
        async with self._db.transaction() as conn:
            rows = (
                (await conn.execute(EXPIRED_VERIFICATIONS, {"now": self._clock.now(), "n": limit}))
                .scalars()
                .all()
            )
            for transaction_id in rows:
                payment = await repository.load_payment(conn, transaction_id, self._master)
                assert payment is not None
                await _fail(conn, payment, EXPIRED_CODE, self._clock)
        return len(rows)

    async def step(self) -> int:
        return await self.expire_due()

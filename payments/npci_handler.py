"""The NPCI handler: sends payments to the switch and records what it answered.

Never a double debit:

* The handler moves a payment to ``SUBMITTED`` and commits *before* calling the switch.
* Redelivered (crash, error, rebalance) and finding the payment ``SUBMITTED``, it does not
  resubmit blindly: it asks the switch (check-status) first, and sends the pay request only
  if the switch never saw the transaction. The switch refuses to debit twice for one txn id.
* No answer within the pay leg timeout (15 s), or a refusal, makes the payment ``DEEMED``:
  only the switch can say that nothing was debited (a duplicate delivery may be sending the
  same txn id at that moment). The :class:`DeemedResolver` then polls check-status with
  exponential backoff. If the switch never saw the txn id, it is voided there at once
  (``FAILED``; a late request can no longer debit); if it stays pending past
  ``max_deemed_age_s``, it is reversed: a debit is returned (``REVERSED``).
* Results are recorded with the inbox row in one transaction, so a later redelivery is a
  no-op; every outcome is an event.

Retries only where safe: check-status and reversal are idempotent and retried freely; a pay
request is only ever resent for a transaction the switch says it never saw.

A circuit breaker per remitter bank (:mod:`payments.npci.breaker`) fails payments fast with
``U90`` while the bank is unwell, before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import assert_never

from sqlalchemy.ext.asyncio import AsyncConnection

from core.bus.base import Subscription
from core.clock import Clock
from core.errors import PoisonMessage, SwitchError, SwitchTimeout
from core.events import (
    CATALOGUE,
    Envelope,
    Event,
    FraudAssessed,
    PaymentDeemed,
    PaymentReversed,
    PaymentSubmitted,
    PaymentSucceeded,
    PaymentVerified,
    Topic,
)
from core.inbox import already_processed_many
from core.metrics import SWITCH_LATENCY
from core.pii import Vpa, mask_vpa
from core.polling import PollingWorker
from core.storage import Database, sql_text
from payments import repository
from payments.changes import PaymentChanges
from payments.domain import Payment, PaymentStatus
from payments.npci.banks import bank_of
from payments.npci.breaker import BankBreakers, BreakerPolicy, CircuitBreaker
from payments.npci.codes import BANK_UNAVAILABLE, Outcome, describe, outcome_of
from payments.npci.switch import PayRequest, SwitchClient, SwitchResult
from payments.publishing import failed_event, finish
from payments.verification import VerificationPolicy, apply_fraud_decision

__all__ = [
    "DeemedResolver",
    "NpciHandler",
    "NpciTimings",
    "record_switch_answer",
    "switch_answer",
]

_log = logging.getLogger(__name__)
DEEMED_CODE = "RB"
BREAKER_OPEN_CODE = "U90"
SWITCH_UNAVAILABLE_CODE = "U28"


@dataclass(frozen=True)
class NpciTimings:
    pay_timeout_s: float = 15.0
    check_status_timeout_s: float = 10.0
    first_check_s: float = 5.0
    max_check_interval_s: float = 60.0
    max_deemed_age_s: float = 300.0

    def next_check_after(self, attempts: int) -> float:
        return float(min(self.max_check_interval_s, self.first_check_s * 2 ** max(0, attempts)))


def switch_answer(
    changes: PaymentChanges,
    payment: Payment,
    result: SwitchResult,
    *,
    clock: Clock,
    timings: NpciTimings,
    cause: Envelope | None = None,
) -> Payment:
    """Apply the switch's answer to a ``SUBMITTED`` or ``DEEMED`` payment (row locked);
    returns the payment after it."""
    now = clock.now()
    code = result.response_code
    outcome = outcome_of(code) if result.known else Outcome.PENDING
    match outcome:
        case Outcome.SUCCESS:
            after = payment.transition(
                PaymentStatus.SUCCESS,
                at=now,
                response_code=code,
                rrn=result.rrn,
                payer_bank=result.payer_bank,
                payee_bank=result.payee_bank,
            )
            return changes.transition(
                payment,
                after,
                PaymentSucceeded(
                    transaction_id=payment.transaction_id,
                    merchant_id=payment.merchant_id,
                    amount_paise=payment.amount_paise,
                    response_code=code,
                    rrn=result.rrn,
                    completed_at=now,
                    payer_vpa=Vpa(payment.payer_vpa),
                    payee_vpa=Vpa(payment.payee_vpa),
                    payer_bank=result.payer_bank or "UNKNOWN",
                    payee_bank=result.payee_bank or "UNKNOWN",
                    merchant_mcc=payment.mcc,
                ),
                cause,
            )
        case Outcome.FAILED:
            after = payment.transition(
                PaymentStatus.FAILED,
                at=now,
                response_code=code,
                reason=describe(code),
                rrn=result.rrn,
                payer_bank=result.payer_bank,
                payee_bank=result.payee_bank,
            )
            return changes.transition(
                payment,
                after,
                failed_event(payment, code, result.rrn, now),
                cause,
            )
        case Outcome.DEEMED | Outcome.PENDING:
            if payment.status is PaymentStatus.DEEMED:
                return payment  # still unknown: the resolver reschedules
            after = payment.transition(
                PaymentStatus.DEEMED, at=now, response_code=code, reason=describe(code)
            )
            return changes.transition(
                payment,
                after,
                PaymentDeemed(
                    transaction_id=payment.transaction_id,
                    merchant_id=payment.merchant_id,
                    response_code=code,
                    deemed_at=now,
                ),
                cause,
                next_check_at=now + timedelta(seconds=timings.next_check_after(0)),
            )
        case _:
            assert_never(outcome)


async def record_switch_answer(
    conn: AsyncConnection,
    payment: Payment,
    result: SwitchResult,
    *,
    clock: Clock,
    timings: NpciTimings,
    cause: Envelope | None = None,
) -> PaymentStatus:
    """:func:`switch_answer` for one payment, written at once; the status after."""
    changes = PaymentChanges(clock)
    after = switch_answer(changes, payment, result, clock=clock, timings=timings, cause=cause)
    await changes.flush(conn)
    return after.status


@dataclass
class _Submission:
    """A payment of the batch that goes to the switch, and the events waiting on it."""

    payment: Payment
    resubmission: bool  # we were here before and do not know the answer
    events: list[uuid.UUID]
    cause: Envelope
    breaker: CircuitBreaker | None


class NpciHandler:
    """Consumes ``FraudAssessed`` (the payment waited for it) and ``PaymentVerified`` (a
    step-up passed), either of which may release a payment to the switch, a batch at a
    time: one transaction records every decision and moves the released payments to
    ``SUBMITTED``; the switch is asked about all of them at once; one transaction records
    every answer with the inbox rows."""

    consumer = "npci-handler"

    def __init__(
        self,
        db: Database,
        switch: SwitchClient,
        clock: Clock,
        timings: NpciTimings | None = None,
        breakers: BankBreakers | None = None,
        verification: VerificationPolicy | None = None,
    ) -> None:
        self._db = db
        self.verification = verification or VerificationPolicy()
        self._switch = switch
        self._clock = clock
        self.timings = timings or NpciTimings()
        self.breakers = breakers or BankBreakers(BreakerPolicy(), clock)

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value, Topic.FRAUD.value),
            handler=self.handle,
            batch_handler=self.handle_batch,
            event_types=frozenset({FraudAssessed.name, PaymentVerified.name}),
            # A batch waits for its slowest switch answer (a bank's p99 is hundreds of ms):
            # the next ones go on meanwhile. Safe: each payment's row is locked and its
            # status checked, and payments of one payer are independent at the switch.
            parallel_batches=8,
        )

    async def handle(self, envelope: Envelope) -> None:
        await self.handle_batch([envelope])

    async def handle_batch(self, envelopes: Sequence[Envelope]) -> None:
        decoded: list[tuple[Envelope, FraudAssessed | PaymentVerified]] = []
        for envelope in envelopes:
            event = CATALOGUE.decode(envelope)
            if not isinstance(event, FraudAssessed | PaymentVerified):
                raise PoisonMessage(f"npci-handler does not handle {envelope.event_type}")
            decoded.append((envelope, event))
        submissions = await self._release(decoded)
        if not submissions:
            return
        answers = await asyncio.gather(
            *(self._answer(s) for s in submissions), return_exceptions=True
        )
        failed: BaseException | None = None
        changes = PaymentChanges(self._clock, self.consumer)
        async with self._db.transaction() as conn:
            current = await repository.load_payments(
                conn, [s.payment.transaction_id for s in submissions], for_update=True
            )
            for submission, answer in zip(submissions, answers, strict=True):
                if isinstance(answer, BaseException):
                    failed = failed or answer  # check-status failed: retried with the batch
                    continue
                payment = current[submission.payment.transaction_id]
                if payment.status is PaymentStatus.SUBMITTED:
                    switch_answer(
                        changes,
                        payment,
                        answer,
                        clock=self._clock,
                        timings=self.timings,
                        cause=submission.cause,
                    )
                for event_id in submission.events:
                    changes.claim(event_id)
            await changes.flush(conn)
        if failed is not None:
            raise failed

    async def _release(
        self, decoded: Sequence[tuple[Envelope, FraudAssessed | PaymentVerified]]
    ) -> list[_Submission]:
        """The first transaction: record the decisions, submit what may go to the switch."""
        changes = PaymentChanges(self._clock, self.consumer)
        submissions: dict[str, _Submission] = {}
        async with self._db.transaction() as conn:
            done = await already_processed_many(
                conn, self.consumer, [envelope.event_id for envelope, _ in decoded]
            )
            current = await repository.load_payments(
                conn, [event.transaction_id for _, event in decoded], for_update=True
            )
            for envelope, event in decoded:
                if envelope.event_id in done:
                    continue
                done.add(envelope.event_id)  # the same event twice in one batch: once
                txn = event.transaction_id
                payment = current.get(txn)
                if payment is None:
                    raise PoisonMessage(f"{envelope.event_type} for unknown payment {txn}")
                if txn in submissions:  # already going to the switch in this batch
                    submissions[txn].events.append(envelope.event_id)
                    continue
                payment = self._decide(changes, payment, envelope, event, submissions)
                current[txn] = payment
            await changes.flush(conn)
        return list(submissions.values())

    def _decide(
        self,
        changes: PaymentChanges,
        payment: Payment,
        envelope: Envelope,
        event: FraudAssessed | PaymentVerified,
        submissions: dict[str, _Submission],
    ) -> Payment:
        txn = payment.transaction_id
        releasable = PaymentStatus.PENDING_VERIFICATION
        if isinstance(event, FraudAssessed) and payment.status is PaymentStatus.INITIATED:
            payment = apply_fraud_decision(
                changes, payment, event, envelope, self._clock, self.verification
            )
            releasable = PaymentStatus.INITIATED
        match payment.status:
            case status if status is releasable:
                now = self._clock.now()
                payer_bank = bank_of(payment.payer_vpa) or "UNKNOWN"
                breaker = self.breakers[payer_bank]
                if not breaker.allow():
                    failed = payment.transition(
                        PaymentStatus.FAILED,
                        at=now,
                        response_code=BREAKER_OPEN_CODE,
                        reason=f"{payer_bank}: {describe(BREAKER_OPEN_CODE)}",
                    )
                    event_failed = failed_event(payment, BREAKER_OPEN_CODE, None, now)
                    changes.claim(envelope.event_id)
                    return changes.transition(payment, failed, event_failed, envelope)
                submitted = payment.transition(PaymentStatus.SUBMITTED, at=now)
                changes.transition(
                    payment,
                    submitted,
                    PaymentSubmitted(
                        transaction_id=txn,
                        merchant_id=payment.merchant_id,
                        payer_vpa=Vpa(payment.payer_vpa),
                        payee_vpa=Vpa(payment.payee_vpa),
                        amount_paise=payment.amount_paise,
                        submitted_at=now,
                    ),
                    envelope,
                )
                submissions[txn] = _Submission(
                    submitted, False, [envelope.event_id], envelope, breaker
                )
                return submitted
            case PaymentStatus.SUBMITTED:
                submissions[txn] = _Submission(payment, True, [envelope.event_id], envelope, None)
                return payment
            case _:
                # Stepped up or blocked just now; final; or owned by another flow (the
                # deemed resolver). A verification for a payment not (or no longer)
                # awaiting it changes nothing.
                changes.claim(envelope.event_id)
                return payment

    async def _answer(self, submission: _Submission) -> SwitchResult:
        """The switch's answer for one submission; raises only for a failed check-status
        of a resubmission (safe to retry)."""
        payment, breaker = submission.payment, submission.breaker
        txn = payment.transaction_id
        payer_bank = bank_of(payment.payer_vpa) or "UNKNOWN"
        request = PayRequest(
            txn_id=txn,
            payer_vpa=payment.payer_vpa,
            payee_vpa=payment.payee_vpa,
            amount_paise=payment.amount_paise,
            note=payment.note,
        )
        try:
            result = await self._ask_switch(request, submission.resubmission)
        except (TimeoutError, SwitchTimeout):
            # No answer: the debit may or may not have happened. Never resend; deem it.
            result = SwitchResult(txn, DEEMED_CODE, None, payer_bank, None, known=True)
            if breaker is not None:
                breaker.record(False)
        except SwitchError as exc:
            if breaker is not None:
                breaker.record(False)
            if submission.resubmission:
                raise  # check-status failed: safe to retry the whole delivery
            # This request was refused unprocessed, but a duplicate delivery may be sending
            # the same txn id right now: only the switch can say nothing was debited. Deem
            # it; the resolver asks at once and voids the id if the switch never saw it.
            _log.warning("switch refused: %s", exc, extra={"transaction_id": txn})
            result = SwitchResult(txn, SWITCH_UNAVAILABLE_CODE, None, payer_bank, None, known=False)
        except BaseException:
            if breaker is not None:
                breaker.record(False)
            raise
        else:
            if breaker is not None:
                breaker.record(result.response_code not in BANK_UNAVAILABLE)
        if _log.isEnabledFor(logging.INFO):
            _log.info(
                "switch answered %s",
                result.response_code,
                extra={"transaction_id": txn, "payer_vpa": mask_vpa(payment.payer_vpa)},
            )
        return result

    async def _ask_switch(self, request: PayRequest, resubmission: bool) -> SwitchResult:
        if resubmission:
            with SWITCH_LATENCY.labels("check_status").time():
                status = await asyncio.wait_for(
                    self._switch.check_status(request.txn_id), self.timings.check_status_timeout_s
                )
            if status.known:
                return status
        with SWITCH_LATENCY.labels("pay").time():
            return await asyncio.wait_for(self._switch.pay(request), self.timings.pay_timeout_s)


# The resolver's scans, each on its partial index (payments.0003, payments.0007).
DEEMED_DUE = sql_text(
    "SELECT transaction_id FROM payments WHERE status = 'DEEMED'"
    " AND next_check_at <= :now ORDER BY next_check_at LIMIT :n"
    " FOR UPDATE SKIP LOCKED"
)
STALE_SUBMISSIONS = sql_text(
    "SELECT transaction_id FROM payments WHERE status = 'SUBMITTED'"
    " AND updated_at < :before ORDER BY updated_at LIMIT :n"
    " FOR UPDATE SKIP LOCKED"
)


class DeemedResolver(PollingWorker):
    """Resolves ``DEEMED`` payments: check-status with backoff, reversal past the max age.

    Several resolvers may run (one per switch worker): due rows are leased with
    ``FOR UPDATE SKIP LOCKED`` and their next check pushed past the lease, so each is asked
    about by one worker at a time.
    """

    name = "deemed resolver"

    def __init__(
        self,
        db: Database,
        switch: SwitchClient,
        clock: Clock,
        timings: NpciTimings | None = None,
        *,
        batch_size: int = 50,
        poll_interval_s: float = 0.5,
    ) -> None:
        super().__init__(poll_interval_s)
        self._db = db
        self._switch = switch
        self._clock = clock
        self.timings = timings or NpciTimings()
        self._batch = batch_size

    async def run_once(self) -> int:
        """Ask about every due deemed payment once; returns how many were due."""
        await self._deem_stale_submissions()
        now = self._clock.now()
        lease = now + timedelta(seconds=self.timings.check_status_timeout_s * 2 + 1)
        async with self._db.transaction() as conn:
            due = list((await conn.execute(DEEMED_DUE, {"now": now, "n": self._batch})).scalars())
            for txn in due:
                await repository.schedule_check(conn, txn, lease)
        if due:
            await asyncio.gather(*(self._resolve(txn) for txn in due))
        return len(due)

    async def step(self) -> int:
        return await self.run_once()

    async def _deem_stale_submissions(self) -> None:
        """A payment left ``SUBMITTED`` well past the pay timeout lost its handler (crash,
        dead letter): deem it, so that check-status decides, never a resend."""
        now = self._clock.now()
        stale_before = now - timedelta(seconds=self.timings.pay_timeout_s * 2 + 5)
        async with self._db.transaction() as conn:
            rows = (
                await conn.execute(STALE_SUBMISSIONS, {"before": stale_before, "n": self._batch})
            ).scalars()
            for txn in list(rows):
                payment = await repository.load_payment(conn, txn)
                assert payment is not None
                stale = SwitchResult(txn, DEEMED_CODE, None, None, None)
                await record_switch_answer(
                    conn, payment, stale, clock=self._clock, timings=self.timings
                )

    async def _resolve(self, txn: str) -> None:
        timings = self.timings
        try:
            answer = await asyncio.wait_for(
                self._switch.check_status(txn), timings.check_status_timeout_s
            )
        except (TimeoutError, SwitchError) as exc:
            _log.info("check-status failed: %s", exc, extra={"transaction_id": txn})
            answer = None
        async with self._db.transaction() as conn:
            payment = await repository.load_payment(conn, txn, for_update=True)
            if payment is None or payment.status is not PaymentStatus.DEEMED:
                return
            never_seen = answer is not None and not answer.known
            if answer is not None and answer.known:
                status = await record_switch_answer(
                    conn, payment, answer, clock=self._clock, timings=timings
                )
                if status is not PaymentStatus.DEEMED:
                    return
            age = (self._clock.now() - payment.created_at).total_seconds()
            # The switch never saw it: void the id now (a late request can no longer debit).
            # Otherwise keep asking until the max age, then reverse.
            if not never_seen and age < timings.max_deemed_age_s:
                attempts = await repository.count_check(conn, txn)
                await repository.schedule_check(
                    conn,
                    txn,
                    self._clock.now() + timedelta(seconds=timings.next_check_after(attempts)),
                )
                return
        await self._reverse(txn)

    async def _reverse(self, txn: str) -> None:
        try:
            reversal = await asyncio.wait_for(
                self._switch.reverse(txn), self.timings.check_status_timeout_s
            )
        except (TimeoutError, SwitchError) as exc:
            _log.warning("reversal failed, will retry: %s", exc, extra={"transaction_id": txn})
            return  # the lease expires and the next run tries again
        async with self._db.transaction() as conn:
            payment = await repository.load_payment(conn, txn, for_update=True)
            if payment is None or payment.status is not PaymentStatus.DEEMED:
                return
            now = self._clock.now()
            if reversal.reversed:
                reason = f"deemed, then reversed ({reversal.response_code})"
                after = payment.transition(PaymentStatus.REVERSED, at=now, reason=reason)
                event: Event = PaymentReversed(
                    transaction_id=txn,
                    merchant_id=payment.merchant_id,
                    amount_paise=payment.amount_paise,
                    response_code=after.response_code or DEEMED_CODE,
                    rrn=payment.rrn,
                    completed_at=now,
                    payer_vpa=Vpa(payment.payer_vpa),
                    payer_bank=bank_of(payment.payer_vpa) or "UNKNOWN",
                )
            elif reversal.response_code == "21":  # nothing was debited; the id is void now
                # A request the switch refused keeps its own code; anything else says 21.
                refused = payment.response_code == SWITCH_UNAVAILABLE_CODE
                code = SWITCH_UNAVAILABLE_CODE if refused else reversal.response_code
                after = payment.transition(
                    PaymentStatus.FAILED, at=now, response_code=code, reason=describe(code)
                )
                event = failed_event(payment, code, payment.rrn, now)
            else:
                return  # reversal failed (96): the lease expires, the next run retries
            await finish(conn, payment, after, event, self._clock, None)

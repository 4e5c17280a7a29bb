"""The NPCI handler: sends payments to the switch and records what it answered.

Never a double debit:

* The handler moves a payment to ``SUBMITTED`` and commits *before* calling the switch.
* Redelivered (crash, error, rebalance) and finding the payment ``SUBMITTED``, it never
  resubmits: its pay request may be out, and NPCI allows no check-status before 90 s after
  it. It deems the payment, and the resolver asks when the rule allows. The switch refuses
  to debit twice for one txn id anyway.
* No answer within the pay leg timeout (15 s), or a refusal, makes the payment ``DEEMED``:
  only the switch can say that nothing was debited (a duplicate delivery may be sending the
  same txn id at that moment). The :class:`DeemedResolver` then asks check-status on
  NPCI's budget (:class:`~payments.npci.rules.CheckStatusPlan`: the first check 90 s after
  the pay leg closed, at most 3 in 2 hours). If the switch never saw the txn id, it is
  voided there at once (``FAILED``; a late request can no longer debit); if it is still
  pending when the budget is spent, it is reversed: a debit is returned (``REVERSED``).
* Results are recorded with the inbox row in one transaction, so a later redelivery is a
  no-op; every outcome is an event.

Retries only where safe: a pay request is never resent; check-status is asked only within
NPCI's budget (a failed call counts: the switch may have seen it); a reversal is idempotent
and retried until it answers.

A circuit breaker per remitter bank (:mod:`payments.npci.breaker`) fails payments fast with
``U90`` while the bank is unwell, before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import assert_never

from sqlalchemy.ext.asyncio import AsyncConnection

from core import tracing
from core.bus.base import Subscription
from core.clock import Clock
from core.crypto import MasterKey
from core.errors import PoisonMessage, SwitchError, SwitchRateLimited, SwitchTimeout
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
from core.metrics import SWITCH_BREAKER_STATE, SWITCH_LATENCY
from core.pii import Vpa, mask_vpa
from core.polling import PollingWorker
from core.storage import Database, sql_text
from payments import repository
from payments.changes import PaymentChanges
from payments.domain import Payment, PaymentStatus
from payments.npci.banks import bank_of
from payments.npci.breaker import (
    STATE_LEVELS,
    BankBreakers,
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
)
from payments.npci.codes import BANK_UNAVAILABLE, Outcome, describe, outcome_of
from payments.npci.rules import CheckStatusPlan
from payments.npci.switch import PayRequest, SwitchClient, SwitchResult
from payments.publishing import failed_event, finish
from payments.verification import (
    VerificationPolicy,
    VerificationProvider,
    apply_fraud_decision,
)

__all__ = [
    "DeemedResolver",
    "NpciHandler",
    "NpciTimings",
    "record_switch_answer",
    "show_breaker_state",
    "switch_answer",
]

_log = logging.getLogger(__name__)
DEEMED_CODE = "RB"
BREAKER_OPEN_CODE = "U90"
SWITCH_UNAVAILABLE_CODE = "U28"


@dataclass(frozen=True)
class NpciTimings:
    """The engine's NPCI timers, as in effect (already multiplied by ``time_scale``:
    :meth:`at_scale`)."""

    pay_timeout_s: float = 15.0
    check_status_timeout_s: float = 10.0
    plan: CheckStatusPlan = field(default_factory=CheckStatusPlan)
    time_scale: float = 1.0

    @classmethod
    def at_scale(
        cls,
        time_scale: float = 1.0,
        *,
        pay_timeout_s: float = 15.0,
        check_status_timeout_s: float = 10.0,
        plan: CheckStatusPlan | None = None,
    ) -> NpciTimings:
        """NPCI's timetable (timers at NPCI's own pace) run ``time_scale`` times as fast
        or slow: every timer and every rule window multiplied at once."""
        return cls(
            pay_timeout_s=pay_timeout_s * time_scale,
            check_status_timeout_s=check_status_timeout_s * time_scale,
            plan=(plan or CheckStatusPlan()).scaled(time_scale),
            time_scale=time_scale,
        )

    @property
    def lease_s(self) -> float:
        """How long the resolver holds a due payment while it asks the switch."""
        return self.check_status_timeout_s * 2 + self.time_scale

    @property
    def stale_submission_s(self) -> float:
        """``SUBMITTED`` for longer than this: its handler is gone."""
        return self.pay_timeout_s * 2 + 5 * self.time_scale

    def first_check_at(
        self, submitted_at: datetime, now: datetime, leg_closed_at: datetime | None = None
    ) -> datetime:
        """A payment submitted at ``submitted_at``: its pay request left after that commit,
        and its pay leg closed ``pay_timeout_s`` later; the plan counts from there.
        ``leg_closed_at``: when this handler's own pay call ended (a timeout or a pending
        answer), later than that on a slow commit or a busy loop; the switch had the
        request by then, so the plan counts from it too. Never before ``now``."""
        pay_leg_closed = submitted_at + timedelta(seconds=self.pay_timeout_s)
        if leg_closed_at is not None:
            pay_leg_closed = max(pay_leg_closed, leg_closed_at)
        return max(now, self.plan.first_check_at(pay_leg_closed))


def switch_answer(
    changes: PaymentChanges,
    payment: Payment,
    result: SwitchResult,
    *,
    clock: Clock,
    timings: NpciTimings,
    cause: Envelope | None = None,
    leg_closed_at: datetime | None = None,
) -> Payment:
    """Apply the switch's answer to a ``SUBMITTED`` or ``DEEMED`` payment (row locked);
    returns the payment after it. ``leg_closed_at``: when the pay call that brought
    ``result`` ended (None: no pay call was made now, as on a redelivery)."""
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
            # Submitted (payment.updated_at) and not final: when NPCI's rule first allows
            # a check-status.
            first_check = timings.first_check_at(payment.updated_at, now, leg_closed_at)
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
                next_check_at=first_check,
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
    leg_closed_at: datetime | None = None,
    master: MasterKey,
) -> PaymentStatus:
    """:func:`switch_answer` for one payment, written at once; the status after."""
    changes = PaymentChanges(clock, master=master)
    after = switch_answer(
        changes,
        payment,
        result,
        clock=clock,
        timings=timings,
        cause=cause,
        leg_closed_at=leg_closed_at,
    )
    await changes.flush(conn)
    return after.status


def show_breaker_state(bank: str, state: BreakerState) -> None:
    """A bank's breaker moved (or was made): ``upi_switch_breaker_state{bank}``."""
    SWITCH_BREAKER_STATE.labels(bank).set(STATE_LEVELS[state])


@dataclass
class _Submission:
    """A payment of the batch that goes to the switch, and the events waiting on it."""

    payment: Payment
    events: list[uuid.UUID]
    cause: Envelope
    breaker: CircuitBreaker | None
    answered_at: datetime | None = None  # when its pay call ended


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
        verifier: VerificationProvider | None = None,
        *,
        master: MasterKey,
    ) -> None:
        """``verifier``: the step-up provider told of each challenge opened (unset: the
        mock OTP's, which has nothing to send). ``master``: opens the payers of the payments
        sent to the switch and seals them in the events that follow."""
        self._db = db
        self._master = master
        self.verification = verification or VerificationPolicy()
        self._verifier = verifier
        self._switch = switch
        self._clock = clock
        self.timings = timings or NpciTimings()
        self.breakers = breakers or BankBreakers(BreakerPolicy(), clock, show_breaker_state)

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
        submissions, challenges = await self._release(decoded)
        if not submissions:
            await self._open_challenges(challenges)
            return
        _, answers = await asyncio.gather(
            self._open_challenges(challenges),
            asyncio.gather(*(self._answer(s) for s in submissions), return_exceptions=True),
        )
        failed: BaseException | None = None
        changes = PaymentChanges(self._clock, self.consumer, master=self._master)
        async with self._db.transaction() as conn:
            current = await repository.load_payments(
                conn, [s.payment.transaction_id for s in submissions], self._master, for_update=True
            )
            for submission, answer in zip(submissions, answers, strict=True):
                if isinstance(answer, BaseException):
                    failed = failed or answer  # check-status failed: retried with the batch
                    continue
                payment = current[submission.payment.transaction_id]
                # DEEMED: a duplicate delivery deemed it meanwhile; a definite answer counts.
                if payment.status in (PaymentStatus.SUBMITTED, PaymentStatus.DEEMED):
                    switch_answer(
                        changes,
                        payment,
                        answer,
                        clock=self._clock,
                        timings=self.timings,
                        cause=submission.cause,
                        leg_closed_at=submission.answered_at,
                    )
                for event_id in submission.events:
                    changes.claim(event_id)
            await changes.flush(conn)
        if failed is not None:
            raise failed

    async def _open_challenges(self, stepped_up: Sequence[Payment]) -> None:
        """Tell the step-up provider of the challenges just committed. Best effort, once:
        a challenge that never reaches the payer ends as the window closes (``U69``)."""
        if self._verifier is None or not stepped_up:
            return
        verifier = self._verifier
        results = await asyncio.gather(
            *(verifier.start(p.transaction_id, p.payer_vpa) for p in stepped_up),
            return_exceptions=True,
        )
        for payment, result in zip(stepped_up, results, strict=True):
            if isinstance(result, BaseException):  # VerificationUnavailable, or a bug
                _log.warning(
                    "step-up challenge not sent: %s",
                    result,
                    extra={
                        "transaction_id": payment.transaction_id,
                        "payer_vpa": mask_vpa(payment.payer_vpa),
                    },
                )

    async def _release(
        self, decoded: Sequence[tuple[Envelope, FraudAssessed | PaymentVerified]]
    ) -> tuple[list[_Submission], list[Payment]]:
        """The first transaction: record the decisions, submit what may go to the switch.
        Also returns the payments stepped up by it, to open their challenges after commit."""
        changes = PaymentChanges(self._clock, self.consumer, master=self._master)
        submissions: dict[str, _Submission] = {}
        stepped_up: list[Payment] = []
        async with self._db.transaction() as conn:
            done = await already_processed_many(
                conn, self.consumer, [envelope.event_id for envelope, _ in decoded]
            )
            current = await repository.load_payments(
                conn, [event.transaction_id for _, event in decoded], self._master, for_update=True
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
                before = payment.status
                payment = self._decide(changes, payment, envelope, event, submissions)
                if (
                    before is PaymentStatus.INITIATED
                    and payment.status is PaymentStatus.PENDING_VERIFICATION
                ):
                    stepped_up.append(payment)
                current[txn] = payment
            await changes.flush(conn)
        return list(submissions.values()), stepped_up

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
                submissions[txn] = _Submission(submitted, [envelope.event_id], envelope, breaker)
                return submitted
            case PaymentStatus.SUBMITTED:
                # Redelivered with its pay request possibly out (a crash, a failed batch,
                # a duplicate): never resend, and no check-status before NPCI allows it.
                # Deem it: the resolver asks on the budget's plan.
                changes.claim(envelope.event_id)
                unknown = SwitchResult(txn, DEEMED_CODE, None, None, None)
                return switch_answer(
                    changes,
                    payment,
                    unknown,
                    clock=self._clock,
                    timings=self.timings,
                    cause=envelope,
                )
            case _:
                # Stepped up or blocked just now; final; or owned by another flow (the
                # deemed resolver). A verification for a payment not (or no longer)
                # awaiting it changes nothing.
                changes.claim(envelope.event_id)
                return payment

    async def _answer(self, submission: _Submission) -> SwitchResult:
        """The switch's answer for one submission (a timeout or a refusal deems it), in a
        ``switch.pay`` span of the payment's trace; the events the answer causes are
        children of that span."""
        payer_bank = bank_of(submission.payment.payer_vpa) or "UNKNOWN"
        with tracing.span_for(
            submission.cause,
            "switch.pay",
            kind=tracing.SpanKind.CLIENT,
            attributes={
                "upi.transaction_id": submission.payment.transaction_id,
                "upi.bank": payer_bank,
            },
        ) as span:
            result = await self._pay(submission, payer_bank)
            if span is not None:
                span.set_attribute("upi.response_code", result.response_code)
                submission.cause = tracing.continued(submission.cause, span)
            return result

    async def _pay(self, submission: _Submission, payer_bank: str) -> SwitchResult:
        payment, breaker = submission.payment, submission.breaker
        txn = payment.transaction_id
        request = PayRequest(
            txn_id=txn,
            payer_vpa=payment.payer_vpa,
            payee_vpa=payment.payee_vpa,
            amount_paise=payment.amount_paise,
            note=payment.note,
        )
        try:
            with SWITCH_LATENCY.labels("pay", payer_bank).time():
                result = await asyncio.wait_for(
                    self._switch.pay(request), self.timings.pay_timeout_s
                )
        except (TimeoutError, SwitchTimeout):
            # No answer: the debit may or may not have happened. Never resend; deem it.
            result = SwitchResult(txn, DEEMED_CODE, None, payer_bank, None, known=True)
            if breaker is not None:
                breaker.record(False)
        except SwitchError as exc:
            if breaker is not None:
                breaker.record(False)
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
        finally:
            submission.answered_at = self._clock.now()
        if _log.isEnabledFor(logging.INFO):
            _log.info(
                "switch answered %s",
                result.response_code,
                extra={"transaction_id": txn, "payer_vpa": mask_vpa(payment.payer_vpa)},
            )
        return result


# The resolver's scans, each on its partial index (payments.0003, payments.0007).
DEEMED_DUE = sql_text(
    "SELECT transaction_id, check_attempts, payer_vpa, payer_pii FROM payments"
    " WHERE status = 'DEEMED'"
    " AND next_check_at <= :now ORDER BY next_check_at LIMIT :n"
    " FOR UPDATE SKIP LOCKED"
)
# Leases the due payments and counts the check-status each is about to get, if its budget
# has one left, before the call: a call that reached the switch is spent, answered or not.
_LEASE_DUE = sql_text(
    "UPDATE payments SET next_check_at = :lease, check_attempts = check_attempts"
    " + CASE WHEN transaction_id = ANY(CAST(:asking AS text[])) THEN 1 ELSE 0 END"
    " WHERE transaction_id = ANY(CAST(:ts AS text[]))"
)
STALE_SUBMISSIONS = sql_text(
    "SELECT transaction_id FROM payments WHERE status = 'SUBMITTED'"
    " AND updated_at < :before ORDER BY updated_at LIMIT :n"
    " FOR UPDATE SKIP LOCKED"
)


class SwitchPoller(PollingWorker):
    """A polling worker that asks the switch about payments in batches (the deemed
    resolver, the late-success returner): its database, switch, clock and NPCI timers."""

    default_interval_s = 1.0

    def __init__(
        self,
        db: Database,
        switch: SwitchClient,
        clock: Clock,
        timings: NpciTimings | None = None,
        *,
        master: MasterKey,
        batch_size: int = 50,
        poll_interval_s: float | None = None,
    ) -> None:
        """``master``: opens the payers of the payments asked about, and seals them in the
        events that tell the outcome."""
        super().__init__(self.default_interval_s if poll_interval_s is None else poll_interval_s)
        self._db = db
        self._master = master
        self._switch = switch
        self._clock = clock
        self.timings = timings or NpciTimings()
        self._batch = batch_size


class DeemedResolver(SwitchPoller):
    """Resolves ``DEEMED`` payments: check-status on NPCI's budget, then reversal.

    The plan (:class:`~payments.npci.rules.CheckStatusPlan`) says when: the first check
    90 s after the pay leg closed, then spaced out, at most 3 within 2 hours. Each call is
    counted before it is made (``check_attempts``), so one that failed or timed out is
    spent too: the switch may have counted it. A payment the switch never saw is voided at
    once; one still pending when the budget is spent is reversed.

    Several resolvers may run (one per switch worker): due rows are leased with
    ``FOR UPDATE SKIP LOCKED`` and their next check pushed past the lease, so each is asked
    about by one worker at a time.
    """

    name = "deemed resolver"

    default_interval_s = 0.5

    async def run_once(self) -> int:
        """Ask about (or reverse) every due deemed payment once; returns how many were due."""
        await self._deem_stale_submissions()
        now = self._clock.now()
        lease = now + timedelta(seconds=self.timings.lease_s)
        calls = self.timings.plan.calls
        async with self._db.transaction() as conn:
            due = (await conn.execute(DEEMED_DUE, {"now": now, "n": self._batch})).all()
            # The budget left: ask (the call counted now), or it is spent: reverse.
            asking = {row.transaction_id: int(row.check_attempts) + 1 for row in due}
            asking = {txn: n for txn, n in asking.items() if n <= calls}
            if due:
                await conn.execute(
                    _LEASE_DUE,
                    {"lease": lease, "ts": [r.transaction_id for r in due], "asking": list(asking)},
                )
        if due:
            await asyncio.gather(
                *(
                    self._resolve(
                        r.transaction_id,
                        asking.get(r.transaction_id),
                        bank_of(repository.open_payer(self._master, r)) or "UNKNOWN",
                    )
                    for r in due
                )
            )
        return len(due)

    async def step(self) -> int:
        return await self.run_once()

    async def backlog(self) -> int:
        """Payments DEEMED now, awaiting check-status (``upi_deemed_payments``)."""
        async with self._db.connection() as conn:
            found = await conn.execute(
                sql_text("SELECT count(*) FROM payments WHERE status = 'DEEMED'")
            )
            return int(found.scalar_one())

    async def _deem_stale_submissions(self) -> None:
        """A payment left ``SUBMITTED`` well past the pay timeout lost its handler (crash,
        dead letter): deem it, so that check-status decides, never a resend.

        Its pay leg is taken to close now, not a pay timeout after it was submitted: a
        handler that was only slow (a loaded machine, a short ``UPI_NPCI_TIME_SCALE``) may
        have sent the pay request late, and the first check-status must still come NPCI's
        90 s after the switch received it."""
        now = self._clock.now()
        stale_before = now - timedelta(seconds=self.timings.stale_submission_s)
        async with self._db.transaction() as conn:
            rows = (
                await conn.execute(STALE_SUBMISSIONS, {"before": stale_before, "n": self._batch})
            ).scalars()
            for txn in list(rows):
                payment = await repository.load_payment(conn, txn, self._master)
                assert payment is not None
                stale = SwitchResult(txn, DEEMED_CODE, None, None, None)
                await record_switch_answer(
                    conn,
                    payment,
                    stale,
                    clock=self._clock,
                    timings=self.timings,
                    leg_closed_at=now,
                    master=self._master,
                )

    async def _resolve(self, txn: str, call: int | None, payer_bank: str = "UNKNOWN") -> None:
        """``call``: which check-status of the budget this is (1-based), or None: the budget
        is spent, reverse."""
        if call is None:
            await self._reverse(txn)
            return
        timings = self.timings
        answer: SwitchResult | None = None
        try:
            with SWITCH_LATENCY.labels("check_status", payer_bank).time():
                answer = await asyncio.wait_for(
                    self._switch.check_status(txn), timings.check_status_timeout_s
                )
        except SwitchRateLimited as exc:
            # The plan keeps within NPCI's rule: this is a bug or a clock far off the
            # switch's. The call is spent all the same.
            _log.warning(
                "check-status refused by the switch: %s", exc, extra={"transaction_id": txn}
            )
        except (TimeoutError, SwitchError) as exc:
            _log.info("check-status failed: %s", exc, extra={"transaction_id": txn})
        async with self._db.transaction() as conn:
            payment = await repository.load_payment(conn, txn, self._master, for_update=True)
            if payment is None or payment.status is not PaymentStatus.DEEMED:
                return
            never_seen = answer is not None and not answer.known
            if answer is not None and answer.known:
                status = await record_switch_answer(
                    conn, payment, answer, clock=self._clock, timings=timings, master=self._master
                )
                if status is not PaymentStatus.DEEMED:
                    return
            # The switch never saw it: void the id now (a late request can no longer debit).
            # Otherwise ask again on the plan while the budget lasts, then reverse.
            if not never_seen:
                after = timings.plan.next_check_at(call, self._clock.now())
                if after is not None:
                    await repository.schedule_check(conn, txn, after)
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
            payment = await repository.load_payment(conn, txn, self._master, for_update=True)
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
            await finish(conn, payment, after, event, self._clock, None, master=self._master)

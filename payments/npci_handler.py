"""The NPCI handler: sends payments to the switch and records what it answered.

Never a double debit. The handler moves a payment to ``SUBMITTED`` and commits *before*
calling the switch. If it is redelivered (crash, timeout, rebalance) and finds the
payment already ``SUBMITTED``, it does not resubmit blindly: it asks the switch
(check-status) first and only sends the pay request if the switch never saw the
transaction. The switch itself refuses to debit twice for one txn id. The result is
recorded with the inbox row in one transaction, so a later redelivery is a no-op.
"""

from __future__ import annotations

import logging
from typing import assert_never

from sqlalchemy.ext.asyncio import AsyncConnection

from core.bus.base import Subscription
from core.clock import Clock
from core.errors import PoisonMessage
from core.events import (
    CATALOGUE,
    Envelope,
    Event,
    PaymentDeemed,
    PaymentFailed,
    PaymentInitiated,
    PaymentSubmitted,
    PaymentSucceeded,
    Topic,
)
from core.inbox import already_processed, claim
from core.metrics import PAYMENTS_FINAL, SWITCH_LATENCY
from core.outbox import append_to_outbox
from core.pii import Vpa
from core.storage import Database
from payments import repository
from payments.domain import Payment, PaymentStatus
from payments.npci.codes import Outcome, describe, outcome_of
from payments.npci.switch import PayRequest, SwitchClient, SwitchResult

__all__ = ["NpciHandler"]

_log = logging.getLogger(__name__)


class NpciHandler:
    consumer = "npci-handler"

    def __init__(self, db: Database, switch: SwitchClient, clock: Clock) -> None:
        self._db = db
        self._switch = switch
        self._clock = clock

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=self.handle,
            event_types=frozenset({PaymentInitiated.name}),
        )

    async def handle(self, envelope: Envelope) -> None:
        event = CATALOGUE.decode_as(envelope, PaymentInitiated)
        key = envelope.partition_key
        log_extra = {"transaction_id": event.transaction_id, "payer_vpa": event.payer_vpa.masked}
        async with self._db.transaction() as conn:
            if await already_processed(conn, self.consumer, envelope.event_id):
                return
            payment = await repository.load_payment(conn, event.transaction_id, for_update=True)
            if payment is None:
                raise PoisonMessage(f"PaymentInitiated for unknown payment {event.transaction_id}")
            match payment.status:
                case PaymentStatus.INITIATED:
                    now = self._clock.now()
                    submitted = payment.transition(PaymentStatus.SUBMITTED, at=now)
                    await repository.save_transition(conn, payment, submitted)
                    await append_to_outbox(
                        conn,
                        [
                            self._wrap(
                                PaymentSubmitted(
                                    transaction_id=payment.transaction_id,
                                    merchant_id=payment.merchant_id,
                                    payer_vpa=event.payer_vpa,
                                    payee_vpa=event.payee_vpa,
                                    amount_paise=payment.amount_paise,
                                    submitted_at=now,
                                ),
                                key,
                                envelope,
                            )
                        ],
                    )
                    resubmission = False
                case PaymentStatus.SUBMITTED:
                    resubmission = True  # we were here before and do not know the answer
                case _:
                    # Final, or owned by another flow (verification, deemed polling).
                    await claim(conn, self.consumer, envelope.event_id)
                    return

        request = PayRequest(
            txn_id=payment.transaction_id,
            payer_vpa=payment.payer_vpa,
            payee_vpa=payment.payee_vpa,
            amount_paise=payment.amount_paise,
            note=payment.note,
        )
        result = await self._ask_switch(request, resubmission)
        _log.info("switch answered %s", result.response_code, extra=log_extra)

        async with self._db.transaction() as conn:
            current = await repository.load_payment(conn, payment.transaction_id, for_update=True)
            assert current is not None
            if current.status is PaymentStatus.SUBMITTED:
                await self._record(conn, current, result, event, envelope)
            await claim(conn, self.consumer, envelope.event_id)

    async def _ask_switch(self, request: PayRequest, resubmission: bool) -> SwitchResult:
        if resubmission:
            with SWITCH_LATENCY.labels("check_status").time():
                status = await self._switch.check_status(request.txn_id)
            if status.known:
                return status
        with SWITCH_LATENCY.labels("pay").time():
            return await self._switch.pay(request)

    async def _record(
        self,
        conn: AsyncConnection,
        payment: Payment,
        result: SwitchResult,
        initiated: PaymentInitiated,
        cause: Envelope,
    ) -> None:
        now = self._clock.now()
        code = result.response_code
        outcome = outcome_of(code)
        event: Event
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
                event = PaymentSucceeded(
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
                event = PaymentFailed(
                    transaction_id=payment.transaction_id,
                    merchant_id=payment.merchant_id,
                    amount_paise=payment.amount_paise,
                    response_code=code,
                    rrn=result.rrn,
                    completed_at=now,
                    reason=describe(code),
                )
            case Outcome.DEEMED | Outcome.PENDING:
                after = payment.transition(
                    PaymentStatus.DEEMED, at=now, response_code=code, reason=describe(code)
                )
                event = PaymentDeemed(
                    transaction_id=payment.transaction_id,
                    merchant_id=payment.merchant_id,
                    response_code=code,
                    deemed_at=now,
                )
            case _:
                assert_never(outcome)
        await repository.save_transition(conn, payment, after)
        await append_to_outbox(conn, [self._wrap(event, cause.partition_key, cause)])
        if after.status.is_final:
            PAYMENTS_FINAL.labels(after.status.value).inc()

    def _wrap(self, event: Event, key: str, cause: Envelope) -> Envelope:
        return Envelope.wrap(
            event, partition_key=key, occurred_at=self._clock.now(), causation_id=cause.event_id
        )

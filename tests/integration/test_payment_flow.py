"""The first real path, in one process on the real PostgreSQL: gateway use case → outbox →
in-process bus → NPCI handler → mock switch → final status."""

import asyncio
import base64
import os
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from api.bootstrap import Engine
from core.clock import FakeClock
from core.config import Settings
from core.errors import IdempotencyConflict
from core.events import CATALOGUE, Envelope, FraudAssessed, FraudDecision, PaymentInitiated
from core.pii import Vpa, unkeyed_partition_key
from core.sealing import open_envelope
from fraud.assessor import FraudAssessor
from npcisim.mock import MockSwitch, opening_balance
from payments import service
from payments.domain import PaymentStatus
from payments.merchants import Merchant, insert_merchant
from payments.npci.switch import PayRequest, ReversalResult, SwitchResult
from payments.npci_handler import DeemedResolver, NpciHandler
from payments.verification import VerificationPolicy, verify

pytestmark = pytest.mark.postgres

KEY = base64.b64encode(os.urandom(32)).decode()


def settings() -> Settings:
    return Settings(
        master_key=KEY,
        consumer_retry_base_s=0.01,
        relay_poll_interval_s=0.01,
        npci_mock_latency_scale=0.02,
        npci_mock_decline_scale=0,
    )


@pytest.fixture
async def engine(db_url):
    eng = Engine.build(settings(), url=db_url)
    await eng.start()
    async with eng.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
    yield eng
    await eng.stop()


def command(payer: str, amount: int, key: str, order: str = "o1") -> service.InitiatePayment:
    body = {"payer_vpa": payer, "amount_paise": amount, "merchant_order_id": order}
    return service.InitiatePayment(
        merchant_id="mer_1",
        idempotency_key=key,
        request_hash=service.request_hash(body),
        payer_vpa=Vpa(payer),
        partition_key=unkeyed_partition_key(payer),
        payee_vpa=None,
        amount_paise=amount,
        merchant_order_id=order,
    )


async def final(engine: Engine, txn: str, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        p = await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        if p.status.is_final:
            return p
        assert asyncio.get_running_loop().time() < deadline, f"{txn} still {p.status}"
        await asyncio.sleep(0.02)


async def event_types(engine: Engine, txn: str) -> list[str]:
    async with engine.db.connection() as conn:
        rows = (await conn.execute(text("SELECT envelope FROM outbox ORDER BY id"))).scalars()
        envelopes = [Envelope.from_bytes(bytes(raw)) for raw in rows]
    return [e.event_type for e in envelopes if e.transaction_id == txn]


async def test_success_payer_ends_success_with_code_00_and_rrn(engine):
    result = await service.initiate_payment(
        engine.db,
        command("success@okhdfc", 12345, "k1"),
        engine.clock,
        master=engine.master_key,
    )
    assert result.status_code == 202 and result.body["status"] == "INITIATED"
    p = await final(engine, result.body["transaction_id"])
    assert p.status is PaymentStatus.SUCCESS and p.response_code == "00"
    assert p.rrn is not None and len(p.rrn) == 12 and p.rrn.isdigit()
    assert p.payee_vpa == "shop@okicici" and p.payer_bank == "HDFC" and p.payee_bank == "ICICI"
    assert await event_types(engine, p.transaction_id) == [
        "PaymentInitiated",
        "FraudAssessed",
        "PaymentSubmitted",
        "PaymentSucceeded",
    ]


async def test_insufficient_payer_fails_z9_and_nothing_moves(engine):
    result = await service.initiate_payment(
        engine.db,
        command("insufficient@oksbi", 500, "k1"),
        engine.clock,
        master=engine.master_key,
    )
    p = await final(engine, result.body["transaction_id"])
    assert p.status is PaymentStatus.FAILED and p.response_code == "Z9"
    assert await event_types(engine, p.transaction_id) == [
        "PaymentInitiated",
        "FraudAssessed",
        "PaymentSubmitted",
        "PaymentFailed",
    ]
    async with engine.db.connection() as conn:
        journal = await conn.execute(text("SELECT debited FROM npci_sim.transactions"))
        debited = journal.scalar_one()
    assert debited is False


async def test_ordinary_payer_is_debited_exactly_once_and_payee_credited(engine):
    switch = engine.switch
    assert isinstance(switch, MockSwitch)
    payer = "meera.iyer@ybl"
    before = await switch.balance(payer)
    assert before == opening_balance(payer)
    result = await service.initiate_payment(
        engine.db, command(payer, 25_000, "k1"), engine.clock, master=engine.master_key
    )
    p = await final(engine, result.body["transaction_id"])
    assert p.status is PaymentStatus.SUCCESS
    assert await switch.balance(payer) == before - 25_000
    assert await switch.balance("shop@okicici") == opening_balance("shop@okicici") + 25_000


async def reaches(engine: Engine, txn: str, status: PaymentStatus, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while (
        p := await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
    ).status is not status:
        assert asyncio.get_running_loop().time() < deadline, f"{txn} still {p.status}"
        await asyncio.sleep(0.02)
    return p


async def test_more_than_the_balance_is_declined_z9(engine):
    # A payer whose balance is below the per-transaction and daily limits; the fraud
    # sandbox payer ``fraud-stepup`` makes the path deterministic: step-up, verify, switch.
    payer = next(
        v for h in ("ybl", "ibl", "kotak") if opening_balance(v := f"fraud-stepup@{h}") < 9_000_000
    )
    amount = opening_balance(payer) + 1
    result = await service.initiate_payment(
        engine.db, command(payer, amount, "k1"), engine.clock, master=engine.master_key
    )
    txn = result.body["transaction_id"]
    waiting = await reaches(engine, txn, PaymentStatus.PENDING_VERIFICATION)
    assert waiting.fraud is not None and waiting.fraud["decision"] == "STEP_UP"
    assert "SANDBOX_PAYER" in waiting.fraud["reasons"]
    policy = VerificationPolicy()
    await verify(
        engine.db, "mer_1", txn, policy.otp, engine.clock, policy, master=engine.master_key
    )
    p = await final(engine, txn)
    assert (p.status, p.response_code) == (PaymentStatus.FAILED, "Z9")


async def test_idempotency_replay_conflict_and_concurrency(engine):
    first = await service.initiate_payment(
        engine.db,
        command("success@okhdfc", 100, "same"),
        engine.clock,
        master=engine.master_key,
    )
    again = await service.initiate_payment(
        engine.db,
        command("success@okhdfc", 100, "same"),
        engine.clock,
        master=engine.master_key,
    )
    assert again.replayed and again.body == first.body and again.status_code == 202
    with pytest.raises(IdempotencyConflict):
        await service.initiate_payment(
            engine.db,
            command("success@okhdfc", 101, "same"),
            engine.clock,
            master=engine.master_key,
        )

    racers = await asyncio.gather(
        *(
            service.initiate_payment(
                engine.db,
                command("success@okhdfc", 7, "race"),
                engine.clock,
                master=engine.master_key,
            )
            for _ in range(5)
        )
    )
    assert len({r.body["transaction_id"] for r in racers}) == 1
    assert sum(not r.replayed for r in racers) == 1
    async with engine.db.connection() as conn:
        count = (
            await conn.execute(
                text("SELECT count(*) FROM payments WHERE transaction_id = :t"),
                {"t": racers[0].body["transaction_id"]},
            )
        ).scalar_one()
    assert count == 1


class LosesAnswer:
    """A switch whose network drops: before the request (``before=True``) or the answer."""

    def __init__(self, inner: MockSwitch, *, before: bool) -> None:
        self.inner, self.before, self.pays, self.checks = inner, before, 0, 0

    async def pay(self, request: PayRequest) -> SwitchResult:
        self.pays += 1
        if self.pays == 1 and self.before:
            raise ConnectionError("connection reset before the request left")
        result = await self.inner.pay(request)
        if self.pays == 1:
            raise ConnectionError("connection reset, answer lost")
        return result

    async def check_status(self, txn_id: str) -> SwitchResult:
        self.checks += 1
        return await self.inner.check_status(txn_id)

    async def reverse(self, txn_id: str) -> ReversalResult:
        return await self.inner.reverse(txn_id)


@pytest.mark.parametrize("lost_before_switch_saw_it", [True, False])
async def test_redelivery_after_a_lost_answer_never_debits_twice(db, lost_before_switch_saw_it):
    """The redelivery never resends the pay request, nor asks check-status before NPCI's
    90 s: it deems the payment, and the resolver's first check (on a moved clock, which the
    mock switch shares) decides: the debit stands, or the id the switch never saw is void."""
    clock = FakeClock(datetime.now(UTC))
    eng = Engine.build(
        settings(), url=str(db.engine.url.render_as_string(hide_password=False)), clock=clock
    )
    async with db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
    payer = "kavya.nair@okaxis"
    result = await service.initiate_payment(
        db, command(payer, 9_900, "k1"), clock, master=eng.master_key
    )
    async with db.connection() as conn:
        raw = (
            await conn.execute(
                text(
                    "SELECT envelope FROM outbox WHERE event_type = 'PaymentInitiated'"
                    " ORDER BY id LIMIT 1"
                )
            )
        ).scalar_one()
    initiated = open_envelope(Envelope.from_bytes(bytes(raw)), eng.master_key)
    assert isinstance(CATALOGUE.decode(initiated), PaymentInitiated)
    assessor = FraudAssessor.from_settings(eng.settings, db, eng.master_key, eng.clock)
    await assessor.handle(initiated)  # the fraud decision releases the payment
    assessor.close()
    async with db.connection() as conn:
        raw = (
            await conn.execute(
                text("SELECT envelope FROM outbox WHERE event_type = 'FraudAssessed'")
            )
        ).scalar_one()
    envelope = Envelope.from_bytes(bytes(raw))
    assessed = CATALOGUE.decode(envelope)
    assert isinstance(assessed, FraudAssessed) and assessed.decision is FraudDecision.ALLOW

    real = MockSwitch(db, latency_scale=0, decline_scale=0, clock=clock)
    flaky = LosesAnswer(real, before=lost_before_switch_saw_it)
    handler = NpciHandler(db, flaky, clock, master=eng.master_key)
    with pytest.raises(ConnectionError):
        await handler.handle(envelope)
    txn = result.body["transaction_id"]
    p = await service.get_payment(db, "mer_1", txn, eng.master_key)
    assert p.status is PaymentStatus.SUBMITTED  # committed before the switch call

    await handler.handle(envelope)  # the redelivery
    await handler.handle(envelope)  # and a duplicate of it
    p = await service.get_payment(db, "mer_1", txn, eng.master_key)
    assert p.status is PaymentStatus.DEEMED
    assert (flaky.pays, flaky.checks) == (1, 0)  # nothing resent, nothing asked too early

    resolver = DeemedResolver(db, flaky, clock, master=eng.master_key)
    clock.advance(15 + 90)  # the pay leg, then NPCI's 90 s
    assert await resolver.run_once() == 1
    p = await service.get_payment(db, "mer_1", txn, eng.master_key)
    assert flaky.checks == 1
    assert flaky.pays == 1  # never re-sent
    if lost_before_switch_saw_it:
        assert (p.status, p.response_code) == (PaymentStatus.FAILED, "21")  # voided
        assert await real.balance(payer) == opening_balance(payer)
    else:
        assert p.status is PaymentStatus.SUCCESS
        assert await real.balance(payer) == opening_balance(payer) - 9_900
    assert {c.outcome for c in await real.calls(txn)} == {"answered"}
    async with db.connection() as conn:
        finals = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM payment_status_history WHERE transaction_id = :t"
                    " AND status IN ('SUCCESS','FAILED','BLOCKED','REVERSED')"
                ),
                {"t": txn},
            )
        ).scalar_one()
        counted = await conn.execute(text("SELECT count(*) FROM npci_sim.transactions"))
        journal = counted.scalar_one()
    assert finals == 1 and journal == 1  # the pay, or the void
    await eng.db.close()

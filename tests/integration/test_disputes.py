"""Disputes on the real PostgreSQL with the mock switch's dispute desk: raised by the switch,
accepted, contested (won and lost), accepted automatically at ``respond_by``; the money goes
back to the payer exactly once; each change is an event for the ledger and the webhooks.

NPCI's timetable at 0.02: the ``dispute`` payer's complaint comes 0.1 s after the payment;
the merchant's side answers within 4 s (``respond_s`` 200); a contest is decided 1 s later."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from api.bootstrap import Engine
from core.errors import DisputeRejected, RefundRejected
from npcisim.mock import MockSwitch, opening_balance
from payments import disputes, refunds
from payments.disputes import DisputeStatus
from payments.domain import PaymentStatus
from tests.integration.test_npci import final, pay, start_engine

pytestmark = pytest.mark.postgres

DISPUTES = {
    "npci_mock_dispute_respond_s": 200,
    "npci_mock_dispute_decide_s": 50,
    "dispute_poll_interval_s": 0.05,
    # One payer paying one payee six times in a row is what the cap test needs, not fraud.
    "fraud_block_threshold": 1.0,
    "fraud_step_up_threshold": 1.0,
}
MERCHANT_VPA = "shop@okicici"


@pytest.fixture
async def engine(db_url):
    eng = await start_engine(db_url, **DISPUTES)
    yield eng
    await eng.stop()


async def disputed_payment(engine: Engine, payer: str, amount: int) -> tuple[str, str]:
    """A successful payment by the ``dispute`` payer and the complaint that follows it."""
    txn = await pay(engine, payer, amount)
    assert (await final(engine, txn)).status is PaymentStatus.SUCCESS
    found = await wait_for(lambda: _dispute_of(engine, txn))
    return txn, found


async def _dispute_of(engine: Engine, txn: str) -> str | None:
    async with engine.db.connection() as conn:
        return (
            await conn.execute(
                text("SELECT dispute_id FROM disputes WHERE transaction_id = :t"), {"t": txn}
            )
        ).scalar_one_or_none()


async def wait_for(probe, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def status_of(engine: Engine, dispute_id: str) -> DisputeStatus:
    return (await disputes.get_dispute(engine.db, "mer_1", dispute_id)).status


async def events_of(engine: Engine, dispute_id: str) -> list[str]:
    async with engine.db.connection() as conn:
        rows = await conn.execute(
            text(
                "SELECT event_type FROM outbox WHERE convert_from(envelope, 'UTF8')::jsonb"
                " -> 'payload' ->> 'dispute_id' = :d ORDER BY id"
            ),
            {"d": dispute_id},
        )
        return list(rows.scalars())


async def in_ledger(engine: Engine, dispute_id: str) -> list[str]:
    """The event types of the dispute's events that the compliance ledger holds."""
    async with engine.db.connection() as conn:
        rows = await conn.execute(
            text(
                "SELECT o.event_type FROM outbox o JOIN ledger_entries l ON l.event_id = o.event_id"
                " WHERE convert_from(o.envelope, 'UTF8')::jsonb -> 'payload' ->> 'dispute_id' = :d"
                " ORDER BY o.id"
            ),
            {"d": dispute_id},
        )
        return list(rows.scalars())


async def switch_status(engine: Engine, dispute_id: str) -> str:
    async with engine.db.connection() as conn:
        return (
            await conn.execute(
                text("SELECT status FROM npci_sim.disputes WHERE dispute_id = :d"),
                {"d": dispute_id},
            )
        ).scalar_one()


async def test_a_dispute_accepted_by_the_merchant_gives_the_payer_back_the_money_once(engine):
    switch = engine.switch
    assert isinstance(switch, MockSwitch)
    payer = "dispute@okhdfc"
    merchant_before = await switch.balance(MERCHANT_VPA)
    txn, dispute_id = await disputed_payment(engine, payer, 4_200)
    d = await disputes.get_dispute(engine.db, "mer_1", dispute_id)
    assert (d.status, d.amount_paise, d.transaction_id) == (DisputeStatus.OPEN, 4_200, txn)
    assert d.respond_by > d.raised_at
    assert [x.dispute_id for x in await disputes.list_disputes(engine.db, "mer_1")] == [dispute_id]
    assert await disputes.list_disputes(engine.db, "mer_2") == []
    assert await switch.balance(MERCHANT_VPA) == merchant_before + 4_200

    accepted = await disputes.accept_dispute(engine.db, "mer_1", dispute_id, engine.clock)
    assert (accepted.status, accepted.auto_accepted) == (DisputeStatus.ACCEPTED, False)
    # Accepting again changes nothing; contesting now is refused.
    again = await disputes.accept_dispute(engine.db, "mer_1", dispute_id, engine.clock)
    assert again.status is DisputeStatus.ACCEPTED
    with pytest.raises(DisputeRejected) as refused:
        await disputes.contest_dispute(
            engine.db,
            engine.master_key,
            "mer_1",
            dispute_id,
            evidence="x",
            documents=[],
            clock=engine.clock,
        )
    assert refused.value.code == "dispute_not_open"

    async def at_switch() -> bool:
        return await switch_status(engine, dispute_id) == "ACCEPTED"

    await wait_for(at_switch)
    # The chargeback moved the money back: payee to payer, once.
    assert await switch.balance(MERCHANT_VPA) == merchant_before
    assert await events_of(engine, dispute_id) == ["DisputeRaised", "DisputeAccepted"]

    async def ledgered() -> bool:
        return await in_ledger(engine, dispute_id) == ["DisputeRaised", "DisputeAccepted"]

    await wait_for(ledgered)
    # A chargeback takes the payment's money: nothing is left to refund.
    with pytest.raises(RefundRejected):
        await refunds.request_refund(
            engine.db,
            merchant_id="mer_1",
            transaction_id=txn,
            amount_paise=1,
            idempotency_key="r1",
            request_hash=b"h",
            clock=engine.clock,
            master=engine.master_key,
        )
    await asyncio.sleep(0.3)  # the watcher goes round again: nothing changes
    assert await events_of(engine, dispute_id) == ["DisputeRaised", "DisputeAccepted"]
    assert await switch.balance(MERCHANT_VPA) == merchant_before


@pytest.mark.parametrize(
    ("documents", "outcome", "charged_back"),
    [
        (["invoice INV-7", "awb 1234567890"], DisputeStatus.WON, False),
        ([], DisputeStatus.LOST, True),
    ],
)
async def test_a_contested_dispute_is_decided_by_the_switch(
    engine, documents, outcome, charged_back
):
    switch = engine.switch
    assert isinstance(switch, MockSwitch)
    merchant_before = await switch.balance(MERCHANT_VPA)
    _, dispute_id = await disputed_payment(engine, "dispute@oksbi", 3_000)
    contested = await disputes.contest_dispute(
        engine.db,
        engine.master_key,
        "mer_1",
        dispute_id,
        evidence="Delivered on 2 Dec; signed by the customer.",
        documents=documents,
        clock=engine.clock,
    )
    assert contested.status is DisputeStatus.CONTESTED
    assert list(contested.documents) == documents
    # The evidence is sealed at rest.
    async with engine.db.connection() as conn:
        sealed = (
            await conn.execute(
                text("SELECT evidence_enc FROM disputes WHERE dispute_id = :d"), {"d": dispute_id}
            )
        ).scalar_one()
    assert b"Delivered" not in bytes(sealed)

    async def decided() -> bool:
        return await status_of(engine, dispute_id) is outcome

    await wait_for(decided)
    assert await events_of(engine, dispute_id) == [
        "DisputeRaised",
        "DisputeContested",
        "DisputeResolved",
    ]
    expected = merchant_before + (0 if charged_back else 3_000)
    assert await switch.balance(MERCHANT_VPA) == expected


async def test_an_unanswered_dispute_is_accepted_at_respond_by(engine):
    switch = engine.switch
    assert isinstance(switch, MockSwitch)
    payer = "dispute@ybl"
    merchant_before = await switch.balance(MERCHANT_VPA)
    _, dispute_id = await disputed_payment(engine, payer, 2_500)
    d = await disputes.get_dispute(engine.db, "mer_1", dispute_id)

    async def accepted() -> bool:
        return await status_of(engine, dispute_id) is DisputeStatus.ACCEPTED

    await wait_for(accepted)
    after = await disputes.get_dispute(engine.db, "mer_1", dispute_id)
    assert after.auto_accepted
    assert after.resolved_at == d.respond_by
    with pytest.raises(DisputeRejected):
        await disputes.contest_dispute(
            engine.db,
            engine.master_key,
            "mer_1",
            dispute_id,
            evidence="late",
            documents=["x"],
            clock=engine.clock,
        )

    async def charged_back() -> bool:
        return await switch.balance(MERCHANT_VPA) == merchant_before

    await wait_for(charged_back)
    assert await events_of(engine, dispute_id) == ["DisputeRaised", "DisputeAccepted"]
    assert await switch_status(engine, dispute_id) == "ACCEPTED"


async def test_the_switch_caps_complaints_per_payer_payee_pair(engine):
    switch = engine.switch
    assert isinstance(switch, MockSwitch)
    payer = "ordinary.payer@okaxis"
    txns = [await pay(engine, payer, 500 + i) for i in range(6)]
    for txn in txns:
        assert (await final(engine, txn)).status is PaymentStatus.SUCCESS
    for txn in txns[:5]:
        raised = await switch.raise_dispute(txn)
        assert raised.status == "OPEN"
    from core.errors import SwitchError

    with pytest.raises(SwitchError):
        await switch.raise_dispute(txns[5])  # the 6th for this pair in 30 days: CD2
    with pytest.raises(SwitchError):
        await switch.raise_dispute(txns[0])  # disputed already
    assert opening_balance(payer) > 0

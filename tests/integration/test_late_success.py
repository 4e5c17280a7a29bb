"""Late success end to end in one process on the real PostgreSQL (issue 15, part 6): a
payment the engine holds ``FAILED`` that the switch later reports as debited is found by
settlement's reconciliation against the switch's journal, given back to the payer by a
credit reversal, once, and listed in ``reconciliation.csv``; the payment stays ``FAILED``.

The engine and the mock switch share a moved clock; NPCI's timetable runs 50 times as fast
(``UPI_NPCI_TIME_SCALE`` 0.02), so the mock enforces its check-status rule on that scale."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import os
from datetime import UTC, date, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from api.bootstrap import Engine
from api.switch_journal import SwitchSettlementJournal
from core.clock import IST, FakeClock
from core.config import Settings
from core.events import Envelope, LateSuccessFound
from core.pii import Vpa, unkeyed_partition_key
from npcisim.mock import MockSwitch, opening_balance
from payments import service
from payments.domain import Payment, PaymentStatus
from payments.merchants import Merchant, insert_merchant
from payments.npci.switch import PayRequest
from settlement.holidays import HolidayCalendar
from settlement.run import SettlementResult, settle_business_date

pytestmark = pytest.mark.postgres

SCALE = 0.02
T = date(2026, 3, 10)  # a Tuesday
T0 = datetime(2026, 3, 10, 10, 0, tzinfo=IST).astimezone(UTC)
MERCHANT_VPA = "shop@okicici"


def violations() -> float:
    value = REGISTRY.get_sample_value("npci_mock_api_violations_total", {"api": "check_status"})
    return value or 0.0


async def start(db_url: str, **overrides: object) -> Engine:
    settings = {
        "master_key": base64.b64encode(os.urandom(32)).decode(),
        "consumer_retry_base_s": 0.01,
        "relay_poll_interval_s": 0.01,
        "npci_mock_latency_scale": 0.02,
        "npci_mock_decline_scale": 0,
        "npci_time_scale": SCALE,
        **overrides,
    }
    engine = Engine.build(Settings(**settings), url=db_url, clock=FakeClock(T0))
    await engine.start()
    assert engine.resolver is not None and engine.late_returner is not None
    engine.resolver.interval_s = 0.02
    engine.late_returner.interval_s = 0.02
    async with engine.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", MERCHANT_VPA, "5411", None), b"x")
    return engine


async def pay(engine: Engine, payer: str, amount: int) -> str:
    body = {"payer_vpa": payer, "amount_paise": amount}
    result = await service.initiate_payment(
        engine.db,
        service.InitiatePayment(
            merchant_id="mer_1",
            idempotency_key=payer,
            request_hash=service.request_hash(body),
            payer_vpa=Vpa(payer),
            partition_key=unkeyed_partition_key(payer),
            payee_vpa=None,
            amount_paise=amount,
            merchant_order_id=payer,
        ),
        engine.clock,
        master=engine.master_key,
    )
    engine.outbox_committed()
    return str(result.body["transaction_id"])


def clock_of(engine: Engine) -> FakeClock:
    assert isinstance(engine.clock, FakeClock)
    return engine.clock


async def until(engine: Engine, txn: str, status: PaymentStatus, step_s: float = 0.0) -> Payment:
    """Wait for ``status``, moving the clock ``step_s`` at a time (0: not at all)."""
    for _ in range(400):
        p = await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        if p.status is status:
            return p
        clock_of(engine).advance(step_s)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{txn} still {p.status}")


async def scalar(engine: Engine, sql: str, **params: object) -> object:
    async with engine.db.connection() as conn:
        return (await conn.execute(text(sql), params)).scalar_one_or_none()


async def eventually(engine: Engine, sql: str, expected: object, **params: object) -> None:
    for _ in range(400):
        if (found := await scalar(engine, sql, **params)) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sql}: {found!r}, not {expected!r}")


async def settle(engine: Engine, day: date) -> SettlementResult:
    return await settle_business_date(
        engine.db,
        engine.switch_journal(),
        day,
        calendar=HolidayCalendar.default(),
        mdr_bps={"default": 0},
        clock=engine.clock,
    )


def rows(csv_text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(csv_text)))


async def history(engine: Engine, txn: str) -> list[str]:
    async with engine.db.connection() as conn:
        found = await conn.execute(
            text(
                "SELECT status FROM payment_status_history WHERE transaction_id = :t ORDER BY seq"
            ),
            {"t": txn},
        )
        return list(found.scalars())


async def events_of(engine: Engine, txn: str, event_type: str) -> int:
    found = await scalar(
        engine,
        "SELECT count(*) FROM outbox WHERE event_type = :e"
        " AND convert_from(envelope, 'UTF8')::jsonb ->> 'transaction_id' = :t",
        e=event_type,
        t=txn,
    )
    assert isinstance(found, int)
    return found


async def returned(engine: Engine, txn: str) -> None:
    await eventually(
        engine,
        "SELECT status FROM late_success_returns WHERE transaction_id = :t",
        "RETURNED",
        t=txn,
    )
    await eventually(
        engine,
        "SELECT count(*) FROM ledger_entries WHERE event_type = 'LateSuccessReturned'"
        " AND transaction_id = :t",
        1,
        t=txn,
    )


async def test_the_mock_answers_u30_and_shows_the_debit_late(db):
    clock = FakeClock(T0)
    # The debit shows 100,000 s (clock time) after the answer: on the next business date.
    switch = MockSwitch(
        db, latency_scale=0, decline_scale=0, clock=clock, time_scale=SCALE, late_s=5_000_000
    )
    payer = "late-success@okhdfc"
    request = PayRequest("UPI-LATE-1", payer, MERCHANT_VPA, 500)
    assert (await switch.pay(request)).response_code == "U30"  # the answer: debit failed
    assert await switch.balance(payer) == opening_balance(payer) - 500  # the bank debited
    assert (await switch.pay(request)).response_code == "U30"  # a repeat: no second debit
    assert await switch.balance(payer) == opening_balance(payer) - 500
    clock.advance(90 * SCALE)  # NPCI's rule allows a check-status from here
    assert (await switch.check_status("UPI-LATE-1")).response_code == "U30"
    journal = SwitchSettlementJournal(switch)
    [row] = await journal.rows(T, ["UPI-LATE-1"])
    assert not row.debited  # not in the switch's data of the day it was paid
    clock.advance(100_000)
    assert (await switch.check_status("UPI-LATE-1")).response_code == "00"
    [row] = await journal.rows(T + timedelta(days=1), [])  # in the data of the day it showed
    assert (row.reference, row.debited, row.amount_paise) == ("UPI-LATE-1", True, 500)

    # The runtime fault does the same to a share of a bank's ordinary payments.
    switch.inject("SBI", late_success_rate=1.0)
    other = PayRequest("UPI-LATE-2", "ravi@oksbi", MERCHANT_VPA, 700)
    assert (await switch.pay(other)).response_code == "U30"
    assert await switch.balance("ravi@oksbi") == opening_balance("ravi@oksbi") - 700
    # A reversal before the debit shows finds nothing debited, and leaves the debit standing.
    assert (await switch.reverse("UPI-LATE-2")).response_code == "21"
    assert await switch.balance("ravi@oksbi") == opening_balance("ravi@oksbi") - 700
    clock.advance(100_000)
    assert (await switch.reverse("UPI-LATE-2")).reversed
    assert (await switch.reverse("UPI-LATE-2")).reversed  # idempotent: credited once
    assert await switch.balance("ravi@oksbi") == opening_balance("ravi@oksbi")


async def test_a_failed_payment_the_switch_debits_later_is_reversed_to_the_payer_once(db_url):
    engine = await start(db_url)
    try:
        switch = engine.switch
        assert isinstance(switch, MockSwitch)
        before_violations = violations()
        payer = "late-success@okaxis"
        merchant_before = await switch.balance(MERCHANT_VPA)
        txn = await pay(engine, payer, 4_321)

        # The engine fails it on the switch's answer: final.
        p = await until(engine, txn, PaymentStatus.FAILED)
        assert p.response_code == "U30"
        assert await switch.balance(payer) == opening_balance(payer) - 4_321
        await eventually(
            engine, "SELECT status FROM settlement_other WHERE reference = :r", "FAILED", r=txn
        )
        # The bank's success reaches the switch: its books show the debit.
        clock_of(engine).advance(2 * 60 * SCALE)

        # Settlement's close finds it in the switch's journal.
        closed = await settle(engine, T)
        assert rows(closed.files["reconciliation.csv"]) == [
            {
                "transaction_id": txn,
                "class": "late_success",
                "gateway_status": "FAILED",
                "gateway_amount_paise": "4321",
                "switch_status": "DEBITED",
                "switch_amount_paise": "4321",
                "action": (
                    "reversed to payer: the engine returns the debit by credit reversal"
                    " (automatic); the payment stays FAILED"
                ),
            }
        ]
        assert closed.summary["reconciliation"]["late_success"] == 1
        assert closed.summary["late_successes"] == {txn: 4_321}
        assert closed.summary["interbank_nets_sum_paise"] == 0
        assert sum(int(r["net_paise"]) for r in rows(closed.files["interbank_net.csv"])) == 0
        assert closed.summary["payments"] == 0  # never credited to the merchant

        # The engine gives it back: the payer and the merchant end where they started.
        await returned(engine, txn)
        assert await switch.balance(payer) == opening_balance(payer)
        assert await switch.balance(MERCHANT_VPA) == merchant_before
        p = await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        assert (p.status, p.response_code) == (PaymentStatus.FAILED, "U30")
        assert await history(engine, txn) == ["INITIATED", "SUBMITTED", "FAILED"]
        assert await events_of(engine, txn, "PaymentFailed") == 1
        assert await events_of(engine, txn, "LateSuccessReturned") == 1

        # Redelivered, found again by another close, a second sweep: nothing returns twice.
        found = LateSuccessFound(
            transaction_id=txn, business_date=T.isoformat(), amount_paise=4_321, found_at=T0
        )
        again = Envelope.wrap(found, partition_key=f"settlement:{T}")
        assert engine.late_returner is not None
        await engine.late_returner.handle(again)
        await engine.late_returner.handle(again)
        assert await engine.late_returner.step() == 0
        rerun = await settle(engine, T)
        assert rerun.files == closed.files and not rerun.closed_now
        await asyncio.sleep(0.3)  # the bus had time to deliver anything it had
        assert await events_of(engine, txn, "LateSuccessFound") == 1
        assert await events_of(engine, txn, "LateSuccessReturned") == 1
        assert await switch.balance(payer) == opening_balance(payer)
        # At the switch: the pay request and one reversal; no check-status was spent on it.
        assert [c.api for c in await switch.calls(txn)] == ["pay", "reversal"]
        assert violations() == before_violations
    finally:
        await engine.stop()


async def test_a_deemed_payment_failed_by_check_status_and_debited_the_next_day(db_url):
    # The debit shows ~28 hours (clock time) after the pay request: after the resolver's
    # check-status said U30, on the next business date.
    engine = await start(db_url, npci_mock_late_s=5_000_000)
    try:
        switch = engine.switch
        assert isinstance(switch, MockSwitch)
        before_violations = violations()
        payer = "meera@okaxis"
        switch.inject("AXIS", timeout_rate=1.0, late_success_rate=1.0)
        txn = await pay(engine, payer, 2_500)
        await until(engine, txn, PaymentStatus.DEEMED)
        p = await until(engine, txn, PaymentStatus.FAILED, step_s=0.5)
        assert p.response_code == "U30"
        switch.clear_faults()
        assert await history(engine, txn) == ["INITIATED", "SUBMITTED", "DEEMED", "FAILED"]
        assert await switch.balance(payer) == opening_balance(payer) - 2_500
        await eventually(
            engine, "SELECT status FROM settlement_other WHERE reference = :r", "FAILED", r=txn
        )

        # Day T: the switch's data shows no debit for it yet; nothing to reconcile.
        day_t = await settle(engine, T)
        assert rows(day_t.files["reconciliation.csv"]) == []
        # T+1: the debit shows in the switch's data of that date; found, and given back.
        clock = clock_of(engine)
        clock.advance((datetime(2026, 3, 11, 18, 0, tzinfo=IST) - clock.now()).total_seconds())
        day_1 = await settle(engine, T + timedelta(days=1))
        [row] = rows(day_1.files["reconciliation.csv"])
        assert (row["transaction_id"], row["class"], row["gateway_status"]) == (
            txn,
            "late_success",
            "FAILED",
        )
        assert row["action"].startswith("reversed to payer")
        assert day_1.summary["interbank_nets_sum_paise"] == 0
        await returned(engine, txn)
        assert await switch.balance(payer) == opening_balance(payer)
        assert (
            await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        ).status is PaymentStatus.FAILED
        calls = await switch.calls(txn)
        assert [c.api for c in calls] == ["pay", "check_status", "reversal"]
        assert {c.outcome for c in calls} == {"answered"}
        assert violations() == before_violations
    finally:
        await engine.stop()

"""RBI's turn-around time (SPEC §7, RBI/2019-20/67) end to end in one process on the real
PostgreSQL: deemed payments driven on a moved clock, which the engine and the mock switch
share, through every path: resolved in time, reversed in time, and reversed N days past
T+5 (the payer's bank down meanwhile), which ``tat_compensation.csv`` charges N times ₹100.

NPCI's timetable runs a hundred times as fast (``UPI_NPCI_TIME_SCALE`` 0.01); the days of
the TAT are moved by hand."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import os
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text

from api.bootstrap import Engine
from core.clock import IST, FakeClock
from core.config import Settings
from core.pii import Vpa, unkeyed_partition_key
from npcisim.mock import MockSwitch
from payments import service
from payments.domain import Payment, PaymentStatus
from payments.merchants import Merchant, insert_merchant
from settlement.holidays import HolidayCalendar
from settlement.run import settle_business_date, unreversed_tat_breaches, write_files

pytestmark = pytest.mark.postgres

T = date(2026, 3, 10)  # a Tuesday
T0 = datetime(2026, 3, 10, 10, 0, tzinfo=IST).astimezone(UTC)
N = 3  # days late


def ist(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=IST).astimezone(UTC)


@pytest.fixture
async def engine(db_url):
    clock = FakeClock(T0)
    eng = Engine.build(
        Settings(
            master_key=base64.b64encode(os.urandom(32)).decode(),
            consumer_retry_base_s=0.01,
            relay_poll_interval_s=0.01,
            npci_mock_latency_scale=0.02,
            npci_mock_decline_scale=0,
            npci_time_scale=0.01,
            # A timed-out request stays pending at the switch for 11.6 days at NPCI's pace:
            # 2.8 hours at this scale, past the resolver's three checks unless the clock jumps.
            npci_mock_pending_s=1_000_000,
        ),
        url=db_url,
        clock=clock,
    )
    await eng.start()
    assert eng.resolver is not None
    eng.resolver.interval_s = 0.02
    async with eng.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
    yield eng
    await eng.stop()


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


async def until(engine: Engine, txn: str, status: PaymentStatus, step_s: float = 0.0) -> Payment:
    """Wait for ``status``, moving the clock ``step_s`` at a time (0: not at all)."""
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    for _ in range(600):
        p = await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        if p.status is status:
            return p
        clock.advance(step_s)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{txn} still {p.status}")


async def recorded(engine: Engine, txn: str, status: str) -> None:
    """Settlement has recorded the payment's status (the bus is asynchronous)."""
    for _ in range(400):
        async with engine.db.connection() as conn:
            found = (
                await conn.execute(
                    text("SELECT status FROM settlement_other WHERE reference = :r"), {"r": txn}
                )
            ).scalar_one_or_none()
        if found == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"settlement has {txn} as {found}, not {status}")


async def settle(engine: Engine, day: date):
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


async def test_deemed_payments_through_every_tat_path(engine, tmp_path):
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    switch = engine.switch
    assert isinstance(switch, MockSwitch)

    # Resolved in time: the switch's answer is ready when the first check comes (the clock
    # moved three hours at once): confirmed, no TAT owed.
    resolved = await pay(engine, "timeout-success@okhdfc", 1_000)
    await until(engine, resolved, PaymentStatus.DEEMED)
    clock.advance(3 * 3600)
    assert (await until(engine, resolved, PaymentStatus.SUCCESS)).response_code == "00"

    # Reversed in time: still pending at each of the three checks, then reversed the same
    # day: the TAT is complete, nothing owed.
    in_time = await pay(engine, "timeout-success@oksbi", 2_000)
    await until(engine, in_time, PaymentStatus.DEEMED)
    await until(engine, in_time, PaymentStatus.REVERSED, step_s=1)

    # Breached: debited, the budget spent, and the payer's bank down so that the reversal
    # fails (96) until it comes back N days past T+5.
    late = await pay(engine, "timeout-success@okaxis", 3_000)
    await until(engine, late, PaymentStatus.DEEMED)
    switch.inject("AXIS", down=True)
    for _ in range(600):
        if any(c.api == "reversal" for c in await switch.calls(late)):
            break
        clock.advance(1)
        await asyncio.sleep(0.05)
    assert [c.api for c in await switch.calls(late)][:4] == ["pay"] + ["check_status"] * 3
    assert {c.outcome for c in await switch.calls(late)} == {"answered"}
    await recorded(engine, late, "DEEMED")
    await recorded(engine, in_time, "REVERSED")
    await recorded(engine, resolved, "SETTLED")

    # Day T: nothing late yet.
    day_t = await settle(engine, T)
    assert rows(day_t.files["tat_compensation.csv"]) == []
    assert day_t.summary["tat"] == {
        "breaches": 0,
        "reversed_late": 0,
        "open": 0,
        "days_late": 0,
        "compensation_paise": 0,
    }
    assert await unreversed_tat_breaches(engine.db, engine.switch_journal(), T + timedelta(5)) == 0

    # T+6: one day past the due date (T+5), still not reversed: the breach accrues.
    clock.advance((ist(T + timedelta(days=6)) - clock.now()).total_seconds())
    await asyncio.sleep(0.2)
    assert (
        await service.get_payment(engine.db, "mer_1", late, engine.master_key)
    ).status is PaymentStatus.DEEMED
    assert await unreversed_tat_breaches(engine.db, engine.switch_journal(), T + timedelta(6)) == 1
    day_6 = await settle(engine, T + timedelta(days=6))
    assert rows(day_6.files["tat_compensation.csv"]) == [
        {
            "transaction_id": late,
            "transaction_date": "2026-03-10",
            "due_date": "2026-03-15",
            "reversed_on": "",
            "days_late": "1",
            "compensation_paise": "10000",
        }
    ]

    # T+5+N: the bank is back, the reversal goes through and completes the TAT, N days late.
    clock.advance((ist(T + timedelta(days=5 + N)) - clock.now()).total_seconds())
    switch.clear_faults()
    await until(engine, late, PaymentStatus.REVERSED, step_s=0.5)
    await recorded(engine, late, "REVERSED")
    assert await unreversed_tat_breaches(engine.db, engine.switch_journal(), T + timedelta(9)) == 0
    day_n = await settle(engine, T + timedelta(days=5 + N))
    assert rows(day_n.files["tat_compensation.csv"]) == [
        {
            "transaction_id": late,
            "transaction_date": "2026-03-10",
            "due_date": "2026-03-15",
            "reversed_on": "2026-03-18",
            "days_late": str(N),
            "compensation_paise": str(N * 10_000),
        }
    ]
    assert day_n.summary["tat"] == {
        "breaches": 1,
        "reversed_late": 1,
        "open": 0,
        "days_late": N,
        "compensation_paise": N * 10_000,
    }

    # Twice: identical files.
    again = await settle(engine, T + timedelta(days=5 + N))
    assert again.files == day_n.files and not again.closed_now
    first = write_files(day_n, tmp_path / "a")
    second = write_files(again, tmp_path / "b")
    for name in day_n.files:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "tat_compensation.csv").exists()

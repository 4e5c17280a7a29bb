"""The NPCI handler against the mock switch on the real PostgreSQL: sandbox payers, deemed
payments resolved by check-status, reversals, the circuit breaker under an injected fault.

NPCI's timetable runs 50 times as fast here (``UPI_NPCI_TIME_SCALE`` 0.02): the pay leg in
0.3 s, the first check-status 1.8 s after it, and the mock switch enforcing NPCI's
check-status rule on the same scale."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from api.bootstrap import Engine
from core.config import Settings
from core.pii import Vpa, unkeyed_partition_key
from npcisim.mock import MockSwitch, opening_balance
from payments import service
from payments.domain import PaymentStatus
from payments.merchants import Merchant, insert_merchant
from payments.npci.breaker import BreakerState

pytestmark = pytest.mark.postgres

FAST = {
    "master_key": base64.b64encode(os.urandom(32)).decode(),
    "consumer_retry_base_s": 0.01,
    "relay_poll_interval_s": 0.01,
    "npci_mock_latency_scale": 0.02,
    "npci_mock_decline_scale": 0,
    # NPCI's 15 s pay leg is 0.75 s here: at 0.02 (0.3 s) a loaded machine (the suite's
    # three workers on two cores) sometimes timed out a sandbox payer that must succeed.
    "npci_time_scale": 0.05,
    # These tests are about the switch path. Fraud (tested on its own) would step up some
    # of their payers: many first payments to one shop nobody paid before look like a
    # mule's fan-in to the model.
    "fraud_step_up_threshold": 1.0,
    "fraud_block_threshold": 1.0,
}
SCALE = FAST["npci_time_scale"]


async def start_engine(db_url: str, **overrides: object) -> Engine:
    engine = Engine.build(Settings(**{**FAST, **overrides}), url=db_url)
    await engine.start()
    assert engine.resolver is not None
    engine.resolver.interval_s = 0.05  # tests poll faster
    async with engine.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
    return engine


@pytest.fixture
async def engine(db_url):
    eng = await start_engine(db_url)
    yield eng
    await eng.stop()


async def pay(engine: Engine, payer: str, amount: int = 1_000, key: str | None = None) -> str:
    key = key or os.urandom(8).hex()
    body = {"payer_vpa": payer, "amount_paise": amount, "key": key}
    cmd = service.InitiatePayment(
        merchant_id="mer_1",
        idempotency_key=key,
        request_hash=service.request_hash(body),
        payer_vpa=Vpa(payer),
        partition_key=unkeyed_partition_key(payer),
        payee_vpa=None,
        amount_paise=amount,
        merchant_order_id="o",
    )
    result = await service.initiate_payment(engine.db, cmd, engine.clock, master=engine.master_key)
    engine.outbox_committed()
    return str(result.body["transaction_id"])


async def final(engine: Engine, txn: str, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        p = await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        if p.status.is_final:
            return p
        assert asyncio.get_running_loop().time() < deadline, f"{txn} still {p.status}"
        await asyncio.sleep(0.02)


async def history(engine: Engine, txn: str) -> list[str]:
    async with engine.db.connection() as conn:
        rows = await conn.execute(
            text(
                "SELECT status FROM payment_status_history WHERE transaction_id = :t ORDER BY seq"
            ),
            {"t": txn},
        )
        return list(rows.scalars())


@pytest.mark.parametrize(
    ("payer", "status", "code", "path"),
    [
        ("success@okhdfc", "SUCCESS", "00", ["INITIATED", "SUBMITTED", "SUCCESS"]),
        ("insufficient@ybl", "FAILED", "Z9", ["INITIATED", "SUBMITTED", "FAILED"]),
        ("wrongpin@oksbi", "FAILED", "ZM", ["INITIATED", "SUBMITTED", "FAILED"]),
        ("bank-down@okaxis", "FAILED", "XY", ["INITIATED", "SUBMITTED", "FAILED"]),
        ("timeout-success@paytm", "SUCCESS", "00", ["INITIATED", "SUBMITTED", "DEEMED", "SUCCESS"]),
        (
            "timeout-failure@okicici",
            "FAILED",
            "U30",
            ["INITIATED", "SUBMITTED", "DEEMED", "FAILED"],
        ),
    ],
)
async def test_sandbox_payers_end_as_the_spec_says(engine, payer, status, code, path):
    txn = await pay(engine, payer)
    p = await final(engine, txn)
    assert (p.status.value, p.response_code) == (status, code)
    assert await history(engine, txn) == path
    if status == "SUCCESS":
        assert p.rrn and len(p.rrn) == 12


async def test_still_pending_when_the_budget_is_spent_is_reversed_and_the_payer_made_whole(
    db_url,
):
    # The switch keeps answering "pending" past the resolver's three checks (a short plan,
    # within NPCI's rule: 90 s, 2 min and 2.5 min after the pay leg).
    engine = await start_engine(
        db_url, npci_mock_pending_s=100_000, npci_check_status_plan_s=(90, 120, 150)
    )
    try:
        payer = "timeout-success@okhdfc"
        switch = engine.switch
        assert isinstance(switch, MockSwitch)
        merchant_before = await switch.balance("shop@okicici")
        txn = await pay(engine, payer, 4_200)
        p = await final(engine, txn)
        assert p.status is PaymentStatus.REVERSED
        assert await history(engine, txn) == ["INITIATED", "SUBMITTED", "DEEMED", "REVERSED"]
        assert await switch.balance("shop@okicici") == merchant_before  # credit taken back
        assert await switch.balance(payer) == opening_balance(payer)
        # On the switch's journal: the pay request, three check-status calls on the plan
        # (the first 90 s after the pay request, at NPCI's pace), none refused, the reversal.
        calls = await switch.calls(txn)
        assert [c.api for c in calls] == [
            "pay",
            "check_status",
            "check_status",
            "check_status",
            "reversal",
        ]
        assert {c.outcome for c in calls} == {"answered"}
        pay_at = calls[0].at
        assert (calls[1].at - pay_at).total_seconds() >= 90 * SCALE
        assert (calls[3].at - calls[1].at).total_seconds() <= 7200 * SCALE
    finally:
        await engine.stop()


class DropsRequests:
    """A network that loses every pay request before the switch sees it (answer: timeout)."""

    def __init__(self, inner: MockSwitch) -> None:
        self.inner = inner

    async def pay(self, request):
        await asyncio.sleep(10)
        raise AssertionError("unreachable: the handler times out first")

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_request_the_switch_never_saw_is_voided_and_cannot_debit_later(db_url, db):
    real = MockSwitch(db, latency_scale=0, decline_scale=0, time_scale=SCALE)
    engine = Engine.build(Settings(**FAST), url=db_url, switch=DropsRequests(real))  # type: ignore[arg-type]
    await engine.start()
    try:
        async with engine.db.transaction() as conn:
            await insert_merchant(
                conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x"
            )
        payer = "late.request@okaxis"
        txn = await pay(engine, payer, 777)
        p = await final(engine, txn)
        assert (p.status, p.response_code) == (PaymentStatus.FAILED, "21")
        # The lost request finally arrives: it must not debit.
        from payments.npci.switch import PayRequest

        late = await real.pay(PayRequest(txn, payer, "shop@okicici", 777))
        assert late.response_code == "21"
        assert await real.balance(payer) == opening_balance(payer)
    finally:
        await engine.stop()


@pytest.mark.slow
async def test_a_bank_timing_out_half_its_requests_trips_the_breaker_which_then_closes(db_url):
    engine = await start_engine(
        db_url,
        npci_breaker_window=10,
        npci_breaker_min_calls=6,
        npci_breaker_failure_rate=0.4,
        npci_breaker_cooldown_s=2,
        npci_mock_pending_s=10,
        # A pay leg of 1.2 s (not 0.3 s at this scale): a healthy call on a busy box never
        # times out, so the breaker's outcomes are the injected ones; hung calls hang 2.4 s.
        npci_pay_timeout_s=60,
        npci_mock_hang_s=120,
        # A request cancelled by the timeout before the switch recorded it is unknown at
        # the first check-status, and voided then.
    )
    try:
        switch = engine.switch
        assert isinstance(switch, MockSwitch) and engine.npci_handler is not None
        breaker = engine.npci_handler.breakers["AXIS"]
        switch.inject("AXIS", timeout_rate=0.5)
        switch.reseed(7)  # which requests time out is drawn, repeatably
        finals = {}
        payers = {}
        # One payment after another, as a steady trickle of traffic to the sick bank.
        for i in range(16):
            payer = f"axis.user{i}@okaxis"
            txn = await pay(engine, payer, 1_000 + i)
            finals[txn] = await final(engine, txn)
            payers[txn] = payer
        assert BreakerState.OPEN in breaker.transitions
        deemed = [t for t in finals if "DEEMED" in await history(engine, t)]
        assert deemed, "some answers never came back in time and were deemed"
        fast_failed = [p for p in finals.values() if p.response_code == "U90"]
        assert fast_failed, "while open, payments fail fast with U90"

        # Where the trickle left the breaker depends on the box's pace (closed again, with
        # failures in its window, is possible): a bank that now hangs every call opens it.
        switch.inject("AXIS", timeout_rate=1.0)
        for i in range(10):
            if breaker.state is BreakerState.OPEN:
                break
            payer = f"axis.hung{i}@okaxis"
            txn = await pay(engine, payer, 2_000 + i)
            finals[txn] = await final(engine, txn)
            payers[txn] = payer
        assert breaker.state is BreakerState.OPEN

        switch.clear_faults()
        await asyncio.sleep(2.1)  # cooldown
        # Half-open lets one probe through at a time (others arriving meanwhile would fail
        # fast with U90): the first payment is the probe, and its success closes the breaker.
        probe = await pay(engine, "axis.after0@okaxis", 500)
        assert (await final(engine, probe)).status is PaymentStatus.SUCCESS
        assert breaker.state is BreakerState.CLOSED
        assert breaker.transitions[-2:] == [BreakerState.HALF_OPEN, BreakerState.CLOSED]
        after = [probe] + [await pay(engine, f"axis.after{i}@okaxis", 500) for i in range(1, 5)]
        for t in after:
            assert (await final(engine, t)).status is PaymentStatus.SUCCESS
        assert breaker.state is BreakerState.CLOSED

        # Every payment has exactly one final status and nobody was debited twice.
        async with engine.db.connection() as conn:
            finals_per_txn = (
                await conn.execute(
                    text(
                        "SELECT transaction_id, count(*) FROM payment_status_history"
                        " WHERE status IN ('SUCCESS','FAILED','BLOCKED','REVERSED')"
                        " GROUP BY transaction_id"
                    )
                )
            ).all()
        assert len(finals_per_txn) == len(finals) + len(after)
        assert {n for _, n in finals_per_txn} == {1}
        for txn, payer in payers.items():
            spent = finals[txn].amount_paise if finals[txn].status is PaymentStatus.SUCCESS else 0
            assert await switch.balance(payer) == opening_balance(payer) - spent, payer
    finally:
        await engine.stop()


async def test_a_pay_request_goes_on_at_the_switch_after_its_caller_timed_out(db):
    """The caller's pay leg times out while the switch is still moving the money (here its
    debit waits on the payer's account row). NPCI would finish the request and lose only the
    answer: the mock does the same, and check-status then tells the outcome. Cancelling the
    switch's work with the caller's wait would roll the debit back halfway instead."""
    from payments.npci.switch import PayRequest

    switch = MockSwitch(db, latency_scale=0, decline_scale=0, time_scale=0.001)
    payer, payee = "patient.payer@okaxis", "shop@okicici"
    first = await switch.pay(PayRequest("UPI-TIMEOUT-0", payer, payee, 100))
    assert first.response_code == "00"  # both accounts exist now
    before = await switch.balance(payer)
    async with db.transaction() as blocker:
        await blocker.execute(
            text("SELECT 1 FROM npci_sim.accounts WHERE vpa = :v FOR UPDATE"), {"v": payer}
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(switch.pay(PayRequest("UPI-TIMEOUT-1", payer, payee, 250)), 0.3)
    # The row lock is released: the request the switch received completes (close waits for
    # it), and check-status, 90 s after the pay request at this scale, tells the outcome.
    await switch.close()
    pay_at = (await switch.calls("UPI-TIMEOUT-1"))[0].at
    while (datetime.now(UTC) - pay_at).total_seconds() < 90 * 0.001:
        await asyncio.sleep(0.01)
    status = await switch.check_status("UPI-TIMEOUT-1")
    assert (status.known, status.response_code) == (True, "00")
    assert await switch.balance(payer) == before - 250

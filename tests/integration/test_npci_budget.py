"""NPCI's check-status budget (SPEC §5) on the real PostgreSQL: the mock switch refuses an
early and an excess check-status, so the rule cannot silently vanish; the engine's deemed
resolver keeps within it under a load of ``timeout-*`` payers, on NPCI's real timetable run
a hundred times as fast (``UPI_NPCI_TIME_SCALE`` 0.01)."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from api.bootstrap import Engine
from core.clock import FakeClock
from core.config import Settings
from core.errors import SwitchRateLimited
from core.pii import Vpa, unkeyed_partition_key
from npcisim.mock import MockSwitch
from payments import service
from payments.domain import PaymentStatus
from payments.merchants import Merchant, insert_merchant
from payments.npci.switch import PayRequest

pytestmark = pytest.mark.postgres

SCALE = 0.01
T0 = datetime(2026, 8, 1, 4, 30, tzinfo=UTC)


def violations() -> float:
    value = REGISTRY.get_sample_value("npci_mock_api_violations_total", {"api": "check_status"})
    return value or 0.0


async def test_the_switch_refuses_an_early_and_a_fourth_check_status(db):
    clock = FakeClock(T0)
    switch = MockSwitch(db, latency_scale=0, decline_scale=0, clock=clock)
    before = violations()
    paid = await switch.pay(PayRequest("UPI-BUDGET-1", "success@okhdfc", "shop@okicici", 100))
    assert paid.response_code == "00"

    with pytest.raises(SwitchRateLimited) as early:
        await switch.check_status("UPI-BUDGET-1")  # at once
    assert early.value.reason.startswith("too_early")
    assert early.value.retry_after_s == pytest.approx(90)
    clock.advance(89.9)
    with pytest.raises(SwitchRateLimited):
        await switch.check_status("UPI-BUDGET-1")
    clock.advance(0.1)  # 90 s after the pay request
    for _ in range(3):
        assert (await switch.check_status("UPI-BUDGET-1")).response_code == "00"
        clock.advance(60)
    with pytest.raises(SwitchRateLimited) as excess:
        await switch.check_status("UPI-BUDGET-1")  # a fourth within 2 hours
    assert excess.value.reason.startswith("over_budget")
    assert violations() == before + 3

    calls = await switch.calls("UPI-BUDGET-1")
    assert [(c.api, c.outcome) for c in calls] == [
        ("pay", "answered"),
        ("check_status", "too_early"),
        ("check_status", "too_early"),
        ("check_status", "answered"),
        ("check_status", "answered"),
        ("check_status", "answered"),
        ("check_status", "over_budget"),
    ]
    assert calls[0].at == T0 and calls[3].at == T0 + timedelta(seconds=90)


async def test_the_rule_runs_on_the_time_scale_and_a_bank_that_is_down_cannot_reverse(db):
    clock = FakeClock(T0)
    switch = MockSwitch(db, latency_scale=0, decline_scale=0, clock=clock, time_scale=SCALE)
    await switch.pay(PayRequest("UPI-BUDGET-2", "ravi@okaxis", "shop@okicici", 100))
    clock.advance(0.89)
    with pytest.raises(SwitchRateLimited):
        await switch.check_status("UPI-BUDGET-2")
    clock.advance(0.01)
    assert (await switch.check_status("UPI-BUDGET-2")).response_code == "00"
    switch.inject("AXIS", down=True)
    assert (await switch.reverse("UPI-BUDGET-2")).response_code == "96"
    switch.clear_faults()
    assert (await switch.reverse("UPI-BUDGET-2")).reversed


PAYERS = {
    "timeout-success": (PaymentStatus.SUCCESS, "00"),
    "timeout-failure": (PaymentStatus.FAILED, "U30"),
    "success": (PaymentStatus.SUCCESS, "00"),
}
HANDLES = ("okhdfc", "okicici", "oksbi", "okaxis", "ybl", "paytm")


async def test_a_load_of_timeout_payers_stays_within_the_budget(db_url):
    engine = Engine.build(
        Settings(
            master_key=base64.b64encode(os.urandom(32)).decode(),
            consumer_retry_base_s=0.01,
            relay_poll_interval_s=0.01,
            npci_mock_latency_scale=0.02,
            npci_mock_decline_scale=0,
            npci_time_scale=SCALE,
            # The switch says "pending" for 2 min (NPCI's pace) after a timed-out request:
            # past the first check (90 s after the pay leg), not the second.
            npci_mock_pending_s=120,
            payer_daily_max_count=1000,
            fraud_block_threshold=1.0,
            fraud_step_up_threshold=1.0,
        ),
        url=db_url,
    )
    await engine.start()
    assert engine.resolver is not None
    engine.resolver.interval_s = 0.02
    switch = engine.switch
    assert isinstance(switch, MockSwitch)
    before = violations()
    try:
        async with engine.db.transaction() as conn:
            await insert_merchant(
                conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x"
            )
        expected: dict[str, tuple[PaymentStatus, str]] = {}
        for i in range(36):
            local = list(PAYERS)[i % len(PAYERS)]
            payer = f"{local}@{HANDLES[i % len(HANDLES)]}"
            body = {"i": i}
            result = await service.initiate_payment(
                engine.db,
                service.InitiatePayment(
                    merchant_id="mer_1",
                    idempotency_key=f"load-{i}",
                    request_hash=service.request_hash(body),
                    payer_vpa=Vpa(payer),
                    partition_key=unkeyed_partition_key(payer),
                    payee_vpa=None,
                    amount_paise=1_000 + i,
                    merchant_order_id=f"o{i}",
                ),
                engine.clock,
                master=engine.master_key,
            )
            expected[str(result.body["transaction_id"])] = PAYERS[local]
        engine.outbox_committed()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        finals = {}
        while len(finals) < len(expected):
            assert loop.time() < deadline, f"{len(expected) - len(finals)} never final"
            for txn in set(expected) - set(finals):
                p = await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
                if p.status.is_final:
                    finals[txn] = (p.status, p.response_code)
            await asyncio.sleep(0.1)
        assert finals == expected

        rule = switch.check_status_rule
        asked = 0
        for txn in expected:
            calls = await switch.calls(txn)
            assert {c.outcome for c in calls} == {"answered"}, calls
            checks = [c.at for c in calls if c.api == "check_status"]
            if not checks:
                continue
            asked += 1
            pay_at = calls[0].at
            assert calls[0].api == "pay"
            assert checks[0] - pay_at >= timedelta(seconds=rule.first_after_s)
            assert 1 <= len(checks) <= 3
            assert checks[-1] - checks[0] <= timedelta(seconds=rule.window_s)
        assert asked >= 24, "every timeout payer was deemed and asked about"
        assert violations() == before
    finally:
        await engine.stop()

"""NPCI's check-status rule and the resolver's plan within it, pure (payments/npci/rules.py)."""

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from api.bootstrap import npci_timings
from core.config import Settings
from core.errors import ConfigError, SwitchRateLimited
from payments.npci.http import HttpSwitch
from payments.npci.rules import CHECK_STATUS_RULE, CheckStatusPlan, Refusal, plan_problem
from payments.npci_handler import NpciTimings

T0 = datetime(2026, 8, 1, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_rule_is_npcis_as_reported():
    assert (CHECK_STATUS_RULE.first_after_s, CHECK_STATUS_RULE.max_calls) == (90, 3)
    assert CHECK_STATUS_RULE.window_s == 2 * 3600


def test_a_check_status_before_90_s_after_the_pay_request_is_refused():
    rule = CHECK_STATUS_RULE
    assert rule.refusal(T0, [], at(89.999)) is Refusal.TOO_EARLY
    assert rule.refusal(T0, [], at(90)) is None
    # A transaction the switch never saw has no pay request to count from.
    assert rule.refusal(None, [], at(1)) is None


def test_a_fourth_answered_check_within_2_hours_is_refused_and_the_window_slides():
    rule = CHECK_STATUS_RULE
    answered = [at(90), at(300), at(900)]
    assert rule.refusal(T0, answered[:2], at(901)) is None
    assert rule.refusal(T0, answered, at(901)) is Refusal.OVER_BUDGET
    assert rule.refusal(T0, answered, at(90 + 7200)) is Refusal.OVER_BUDGET
    assert rule.refusal(T0, answered, at(90 + 7200.001)) is None  # the first left the window


def test_the_scale_multiplies_every_window_and_keeps_the_count():
    fast = CHECK_STATUS_RULE.scaled(0.01)
    assert (fast.first_after_s, fast.max_calls, fast.window_s) == (0.9, 3, 72)
    assert fast.refusal(T0, [], at(0.89)) is Refusal.TOO_EARLY
    assert fast.refusal(T0, [], at(0.9)) is None


def test_the_default_plan_asks_three_times_from_the_pay_leg_then_reverses():
    plan = CheckStatusPlan()
    leg_closed = at(15)
    first = plan.first_check_at(leg_closed)
    assert first == at(15 + 90)
    second = plan.next_check_at(1, first)
    assert second == at(15 + 300)
    late = second + timedelta(seconds=40)  # a check made late does not pull the next closer
    third = plan.next_check_at(2, late)
    assert third == late + timedelta(seconds=600)
    assert plan.next_check_at(3, third) is None  # spent: reverse
    # Every call of the plan is allowed by the rule (the pay request reached the switch at
    # the latest when the leg closed, at the earliest just after submission).
    for requested in (at(0), leg_closed):
        calls: list[datetime] = []
        for when in (first, second, third):
            assert CHECK_STATUS_RULE.refusal(requested, calls, when) is None
            calls.append(when)


def test_timings_count_from_the_end_of_the_pay_leg_on_one_scale():
    timings = NpciTimings.at_scale(0.01)
    assert (timings.pay_timeout_s, timings.check_status_timeout_s) == (0.15, 0.1)
    assert timings.plan.offsets_s == (0.9, 3.0, 9.0)
    assert timings.plan.rule.first_after_s == 0.9
    submitted = at(0)
    assert timings.first_check_at(submitted, now=at(0.2)) == at(0.15 + 0.9)
    assert timings.first_check_at(submitted, now=at(5)) == at(5)  # found late: ask now
    # The pay call itself ended late (a slow commit before the request left, a busy loop):
    # the plan counts from its end, so the first check still clears NPCI's 90 s.
    late_leg = at(0.6)
    assert timings.first_check_at(submitted, now=at(0.7), leg_closed_at=late_leg) == at(0.6 + 0.9)
    assert timings.first_check_at(submitted, now=at(0.2), leg_closed_at=at(0.1)) == at(0.15 + 0.9)


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        ((), "at least one"),
        ((60.0, 300.0), "at least 90"),
        ((90.0, 300.0, 900.0, 1800.0), "at most 3"),
        ((90.0, 90.0), "increase"),
    ],
)
def test_a_plan_the_rule_would_refuse_cannot_be_configured(plan, problem):
    found = plan_problem(plan)
    assert found is not None and problem in found
    with pytest.raises(ValueError, match=problem):
        CheckStatusPlan(plan)
    with pytest.raises(ConfigError, match="UPI_NPCI_CHECK_STATUS_PLAN_S"):
        npci_timings(Settings(npci_check_status_plan_s=plan))


def test_the_plan_and_scale_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("UPI_NPCI_TIME_SCALE", "0.5")
    monkeypatch.setenv("UPI_NPCI_CHECK_STATUS_PLAN_S", "[120, 600]")
    timings = npci_timings(Settings())
    assert timings.plan.offsets_s == (60.0, 300.0)
    assert timings.pay_timeout_s == 7.5


async def test_a_429_from_the_switch_is_a_rate_limit_refusal():
    def refused(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            json={"error": "rate_limited", "api": "check_status", "reason": "too_early: x"},
            headers={"Retry-After": "90"},
        )

    switch = HttpSwitch("http://switch", transport=httpx.MockTransport(refused))
    with pytest.raises(SwitchRateLimited) as caught:
        await switch.check_status("UPI1")
    assert (caught.value.api, caught.value.reason) == ("check_status", "too_early: x")

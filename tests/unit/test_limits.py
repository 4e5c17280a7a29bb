"""The 2025 limit table and the pure limit checks (payments/limits.py): no I/O."""

from __future__ import annotations

import pytest

from api.bootstrap import payment_limits
from core.config import Settings
from core.errors import ConfigError, LimitExceeded
from core.money import format_rupees
from payments.limits import (
    CATEGORIES,
    DEFAULT_LIMIT_PAISE,
    MCC_LIMITS_PAISE,
    PayerDailyLimits,
    PayerDay,
    PaymentLimits,
    category_of,
    check_amount,
    check_payer_day,
    daily_override_problem,
    per_transaction_limit,
)

LAKH = 1_00_000_00
GROCER, INSURER, BROKER, JEWELLER, AIRLINE = "5411", "6300", "6211", "5944", "3005"


@pytest.mark.parametrize(
    ("mcc", "category", "per_payment", "per_day"),
    [
        ("6211", "capital_markets", 5 * LAKH, 10 * LAKH),
        ("6300", "insurance", 5 * LAKH, 10 * LAKH),
        ("6381", "insurance", 5 * LAKH, 10 * LAKH),
        ("4511", "travel", 5 * LAKH, 10 * LAKH),
        ("4722", "travel", 5 * LAKH, 10 * LAKH),
        ("3000", "travel", 5 * LAKH, 10 * LAKH),
        ("3350", "travel", 5 * LAKH, 10 * LAKH),
        ("9311", "tax", 5 * LAKH, 10 * LAKH),
        ("7322", "collections", 5 * LAKH, 10 * LAKH),
        ("5944", "jewellery", 2 * LAKH, 6 * LAKH),
        ("8062", "hospitals", 5 * LAKH, 10 * LAKH),
        ("8220", "education", 5 * LAKH, 10 * LAKH),
        ("8299", "education", 5 * LAKH, 10 * LAKH),
    ],
)
def test_the_2025_table_as_reported(mcc, category, per_payment, per_day):
    found = category_of(mcc)
    assert found is not None and found.name == category
    assert found.per_transaction_paise == per_payment == per_transaction_limit(mcc)
    assert found.daily_paise == per_day
    assert "as reported" in found.source


def test_other_mccs_take_the_general_lakh_and_no_category():
    for mcc in (GROCER, "3351", "2999", "5812", "0000"):
        assert category_of(mcc) is None
        assert per_transaction_limit(mcc) == DEFAULT_LIMIT_PAISE == 1 * LAKH


def test_every_mcc_is_in_one_category_and_the_api_bound_is_the_largest_limit():
    seen: dict[str, str] = {}
    for category in CATEGORIES:
        for mcc in category.mccs:
            assert len(mcc) == 4 and mcc.isdigit(), mcc
            assert mcc not in seen, (mcc, seen.get(mcc), category.name)
            seen[mcc] = category.name
    assert set(MCC_LIMITS_PAISE) == set(seen)
    assert max(MCC_LIMITS_PAISE.values()) == 5 * LAKH
    assert len({c.name for c in CATEGORIES}) == len(CATEGORIES)


def test_the_mcc_override_still_sets_a_per_payment_limit():
    overrides = {GROCER: 3 * LAKH, JEWELLER: 1 * LAKH}
    assert per_transaction_limit(GROCER, overrides) == 3 * LAKH
    assert per_transaction_limit(JEWELLER, overrides) == 1 * LAKH
    assert per_transaction_limit(INSURER, overrides) == 5 * LAKH
    limits = PaymentLimits(mcc_overrides=overrides)
    check_amount(GROCER, 3 * LAKH, limits)
    with pytest.raises(LimitExceeded):
        check_amount(JEWELLER, 1 * LAKH + 1, limits)


def test_over_the_per_payment_limit_names_the_limit_the_amount_and_the_category():
    check_amount(JEWELLER, 2 * LAKH, PaymentLimits())
    with pytest.raises(LimitExceeded) as over:
        check_amount(JEWELLER, 2 * LAKH + 1, PaymentLimits())
    assert over.value.code == "amount_over_limit"
    assert over.value.limit_fields() == {"category": "jewellery", "limit_paise": 2 * LAKH}
    detail = str(over.value)
    for part in ("₹2,00,000 (20000000 paise)", "₹2,00,000.01 (20000001 paise)", "jewellery"):
        assert part in detail, detail
    assert "MCC 5944" in detail

    with pytest.raises(LimitExceeded) as general:
        check_amount(GROCER, 1 * LAKH + 100, PaymentLimits())
    assert general.value.limit_fields() == {"category": None, "limit_paise": 1 * LAKH}
    assert "₹1,00,001 (10000100 paise)" in str(general.value)


def day(**by_mcc: tuple[int, int]) -> dict[str, PayerDay]:
    return {mcc.removeprefix("m"): PayerDay(n, total) for mcc, (n, total) in by_mcc.items()}


def test_a_high_value_category_is_not_blocked_by_the_general_day():
    limits = PaymentLimits()  # general day: 20 payments, ₹1,00,000
    spent_at_grocer = day(m5411=(3, 90_000_00))
    check_payer_day(spent_at_grocer, INSURER, 5 * LAKH, limits)
    # ... and the premium does not use up the general day either.
    after_premium = day(m5411=(3, 90_000_00), m6300=(1, 5 * LAKH))
    check_payer_day(after_premium, GROCER, 10_000_00, limits)
    with pytest.raises(LimitExceeded) as over:
        check_payer_day(after_premium, GROCER, 10_000_01, limits)
    assert over.value.code == "payer_daily_amount_exceeded"
    assert over.value.limit_fields() == {"category": None, "limit_paise": 1 * LAKH}


def test_a_category_cap_counts_that_category_only_and_names_itself():
    limits = PaymentLimits()
    # Two MCCs of one category share its day; another category's payments do not count.
    today = day(m6300=(1, 5 * LAKH), m6381=(1, 4 * LAKH), m6211=(2, 10 * LAKH))
    check_payer_day(today, "6399", 1 * LAKH, limits)
    with pytest.raises(LimitExceeded) as over:
        check_payer_day(today, "6399", 1 * LAKH + 1, limits)
    assert over.value.code == "payer_category_daily_amount_exceeded"
    assert over.value.limit_fields() == {"category": "insurance", "limit_paise": 10 * LAKH}
    assert "₹10,00,000 (100000000 paise)" in str(over.value) and "insurance" in str(over.value)
    with pytest.raises(LimitExceeded) as broker:  # capital markets is at its own ₹10 lakh
        check_payer_day(today, BROKER, 1, limits)
    assert broker.value.limit_fields()["category"] == "capital_markets"
    check_payer_day(today, AIRLINE, 5 * LAKH, limits)  # travel: nothing spent yet


def test_jewellery_day_is_six_lakh():
    limits = PaymentLimits()
    check_payer_day(day(m5944=(2, 4 * LAKH)), JEWELLER, 2 * LAKH, limits)
    with pytest.raises(LimitExceeded) as over:
        check_payer_day(day(m5944=(3, 6 * LAKH)), JEWELLER, 1, limits)
    assert over.value.limit_fields() == {"category": "jewellery", "limit_paise": 6 * LAKH}


def test_the_daily_count_counts_every_payment():
    limits = PaymentLimits(payer_daily=PayerDailyLimits(max_count=3))
    with pytest.raises(LimitExceeded) as over:
        check_payer_day(day(m5411=(1, 100), m6300=(2, 200)), INSURER, 100, limits)
    assert over.value.code == "payer_daily_count_exceeded"
    assert over.value.limit_fields() == {"category": None, "limit_count": 3}
    check_payer_day(day(m5411=(1, 100), m6300=(1, 200)), INSURER, 100, limits)


def test_the_daily_cap_override_and_its_check():
    limits = PaymentLimits(category_daily_overrides={"jewellery": 3 * LAKH})
    check_payer_day(day(m5944=(1, 2 * LAKH)), JEWELLER, 1 * LAKH, limits)
    with pytest.raises(LimitExceeded) as over:
        check_payer_day(day(m5944=(1, 2 * LAKH)), JEWELLER, 1 * LAKH + 1, limits)
    assert over.value.limit_fields()["limit_paise"] == 3 * LAKH
    assert daily_override_problem({"jewellery": 1, "insurance": 2}) is None
    problem = daily_override_problem({"jewelry": 1})
    assert problem is not None and "jewelry" in problem and "jewellery" in problem


@pytest.mark.parametrize(
    ("paise", "text"),
    [
        (0, "₹0"),
        (1, "₹0.01"),
        (12_345, "₹123.45"),
        (99_999_00, "₹99,999"),
        (1 * LAKH, "₹1,00,000"),
        (2 * LAKH + 1, "₹2,00,000.01"),
        (10 * LAKH, "₹10,00,000"),
        (1_23_45_678_90, "₹1,23,45,678.90"),
    ],
)
def test_rupees_in_lakh_and_crore_groups(paise, text):
    assert format_rupees(paise) == text


def test_the_overrides_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("UPI_MCC_LIMITS_PAISE", '{"5411": 30000000}')
    monkeypatch.setenv("UPI_CATEGORY_DAILY_LIMITS_PAISE", '{"insurance": 70000000}')
    monkeypatch.setenv("UPI_PAYER_DAILY_MAX_AMOUNT_PAISE", "5000000")
    limits = payment_limits(Settings())
    assert per_transaction_limit(GROCER, limits.mcc_overrides) == 3 * LAKH
    insurance = category_of(INSURER)
    assert insurance is not None and limits.daily_cap(insurance) == 7 * LAKH
    assert limits.payer_daily.max_amount_paise == 50_000_00
    with pytest.raises(LimitExceeded, match="₹7,00,000"):
        check_payer_day(day(m6300=(1, 5 * LAKH)), INSURER, 2 * LAKH + 1, limits)


def test_a_daily_cap_for_an_unknown_category_is_a_configuration_error():
    with pytest.raises(ConfigError, match="UPI_CATEGORY_DAILY_LIMITS_PAISE: unknown"):
        payment_limits(Settings(category_daily_limits_paise={"jewelry": 1}))

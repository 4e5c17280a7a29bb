from datetime import UTC, date, datetime

from hypothesis import given
from hypothesis import strategies as st

from settlement.domain import (
    Item,
    ItemKind,
    JournalRow,
    MismatchClass,
    interbank_positions,
    merchant_payouts,
    reconcile,
    round_half_up,
    withhold_unregistered_payees,
)
from settlement.holidays import HolidayCalendar

AT = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)  # 11:30 IST
BANKS = ["HDFC", "ICICI", "SBI", "AXIS", "YES"]


def pay(
    ref: str,
    amount: int,
    payer="HDFC",
    payee="ICICI",
    merchant="m1",
    mcc="5411",
    payee_vpa: str | None = None,
) -> Item:
    return Item(ItemKind.PAYMENT, ref, ref, merchant, mcc, amount, payer, payee, AT, payee_vpa)


def refund(ref: str, txn: str, amount: int, payer="HDFC", payee="ICICI", merchant="m1") -> Item:
    return Item(ItemKind.REFUND, ref, txn, merchant, "", amount, payer, payee, AT)


@given(
    st.lists(
        st.tuples(
            st.booleans(), st.integers(1, 10**9), st.sampled_from(BANKS), st.sampled_from(BANKS)
        ),
        max_size=60,
    )
)
def test_interbank_nets_always_sum_to_zero(moves):
    items = [
        (pay if is_pay else lambda r, a, p, q: refund(r, r, a, p, q))(f"r{i}", amount, p, q)
        for i, (is_pay, amount, p, q) in enumerate(moves)
    ]
    positions = interbank_positions(items)
    assert sum(p.net_paise for p in positions) == 0
    assert sum(p.debits_paise for p in positions) == sum(i.amount_paise for i in items)


def test_a_refund_flows_back_to_the_payer_bank():
    [hdfc, icici] = interbank_positions([pay("t1", 1_000), refund("r1", "t1", 400)])
    assert (hdfc.bank, hdfc.debits_paise, hdfc.credits_paise, hdfc.net_paise) == (
        "HDFC",
        1_000,
        400,
        -600,
    )
    assert (icici.bank, icici.net_paise) == ("ICICI", 600)


def test_fee_and_gst_round_half_up_once_per_merchant():
    items = [pay("t1", 10_001), pay("t2", 10_000), refund("r", "t1", 1)]
    [p] = merchant_payouts(items, {"5411": 30}, date(2026, 3, 3))
    # gross 20,001 at 30 bps = 60.003 → 60; GST 18% of 60 = 10.8 → 11
    assert (p.gross_paise, p.refunds_paise, p.fee_paise, p.gst_paise) == (20_001, 1, 60, 11)
    assert p.net_paise == 20_001 - 1 - 60 - 11 and p.count == 2
    assert round_half_up(5, 10) == 1 and round_half_up(4, 10) == 0 and round_half_up(15, 10) == 2


def test_upi_p2m_default_mdr_is_zero():
    [p] = merchant_payouts([pay("t", 99_999, mcc="7999")], {"default": 0}, date(2026, 3, 3))
    assert (p.fee_paise, p.gst_paise, p.net_paise) == (0, 0, 99_999)


def test_reconciliation_classifies_every_kind_of_disagreement():
    items = [pay("ok", 100), pay("no-debit", 200), pay("absent", 300), pay("short", 400)]
    journal = [
        JournalRow("ok", ItemKind.PAYMENT, 100, True),
        JournalRow("no-debit", ItemKind.PAYMENT, 200, False),
        JournalRow("short", ItemKind.PAYMENT, 399, True),
        JournalRow("we-failed", ItemKind.PAYMENT, 50, True),
        JournalRow("never-heard", ItemKind.PAYMENT, 60, True),
        JournalRow("failed-clean", ItemKind.PAYMENT, 70, False),
        JournalRow("deemed", ItemKind.PAYMENT, 80, True),
    ]
    settled, mismatches = reconcile(
        items, {"we-failed": 50, "failed-clean": 70}, {"deemed": 80}, journal
    )
    assert [i.reference for i in settled] == ["ok"]
    found = {m.reference: m.mismatch for m in mismatches}
    assert found == {
        "no-debit": MismatchClass.GATEWAY_ONLY,
        "absent": MismatchClass.GATEWAY_ONLY,
        "short": MismatchClass.AMOUNT_MISMATCH,
        "we-failed": MismatchClass.SWITCH_ONLY,
        "never-heard": MismatchClass.SWITCH_ONLY,
        "deemed": MismatchClass.DEEMED_UNRESOLVED,
    }
    assert next(m for m in mismatches if m.reference == "we-failed").action.startswith(
        "credit adjustment"
    )


def test_a_debit_for_a_payment_we_hold_failed_is_a_late_success_given_back_to_the_payer():
    items = [pay("ok", 100)]
    journal = [
        JournalRow("ok", ItemKind.PAYMENT, 100, True),
        JournalRow("late-today", ItemKind.PAYMENT, 50, True),  # failed on this date
        JournalRow("late-earlier", ItemKind.PAYMENT, 60, True),  # failed on an earlier date
        JournalRow("failed-clean", ItemKind.PAYMENT, 70, False),  # failed, and not debited
        JournalRow("blocked", ItemKind.PAYMENT, 80, True),  # not FAILED: not ours to return
        JournalRow("never-heard", ItemKind.PAYMENT, 90, True),
    ]
    failed = {"late-today": 50, "failed-clean": 70, "blocked": 80}
    held_failed = {"late-today": 50, "late-earlier": 60, "failed-clean": 70}
    settled, mismatches = reconcile(items, failed, {}, journal, held_failed)
    assert [i.reference for i in settled] == ["ok"]
    found = {m.reference: m.mismatch for m in mismatches}
    assert found == {
        "late-today": MismatchClass.LATE_SUCCESS,
        "late-earlier": MismatchClass.LATE_SUCCESS,
        "blocked": MismatchClass.SWITCH_ONLY,
        "never-heard": MismatchClass.SWITCH_ONLY,
    }
    late = next(m for m in mismatches if m.reference == "late-earlier")
    assert (late.gateway_status, late.gateway_amount_paise) == ("FAILED", 60)
    assert (late.switch_status, late.switch_amount_paise) == ("DEBITED", 60)
    assert late.action.startswith("reversed to payer")
    # Not settled: a late success moves nothing between the banks in our files.
    assert sum(p.net_paise for p in interbank_positions(settled)) == 0


def test_a_payment_into_a_vpa_not_registered_to_its_merchant_is_withheld_from_the_payout():
    owners = {"shop@okicici": "m1", "shop2@okicici": "m1", "other@ybl": "m2"}
    items = [
        pay("own", 100, payee_vpa="shop@okicici"),
        pay("added", 200, payee_vpa="shop2@okicici"),
        pay("thief", 300, payee_vpa="thief@okaxis"),  # registered to nobody
        pay("others", 400, payee_vpa="other@ybl"),  # another merchant's VPA
        pay("m2-own", 500, merchant="m2", payee_vpa="other@ybl"),
        pay("before", 600),  # recorded before payees were: not known, not checked
        refund("r1", "own", 50),
    ]
    payable, withheld = withhold_unregistered_payees(items, owners)
    assert [i.reference for i in payable] == ["own", "added", "m2-own", "before", "r1"]
    assert [(m.reference, m.mismatch) for m in withheld] == [
        ("thief", MismatchClass.PAYEE_NOT_REGISTERED),
        ("others", MismatchClass.PAYEE_NOT_REGISTERED),
    ]
    thief = withheld[0]
    assert (thief.gateway_status, thief.gateway_amount_paise) == ("SUCCESS", 300)
    assert (thief.switch_status, thief.switch_amount_paise) == ("DEBITED", 300)
    assert thief.action.startswith("withheld from the merchant payout")
    # Only the registered payees are credited to m1; m2 gets its own payment, not m1's.
    by_merchant = {p.merchant_id: p for p in merchant_payouts(payable, {}, date(2026, 3, 3))}
    assert (by_merchant["m1"].gross_paise, by_merchant["m1"].refunds_paise) == (900, 50)
    assert by_merchant["m2"].gross_paise == 500
    # Nobody's registrations: every known payee is withheld.
    payable, withheld = withhold_unregistered_payees(items, {})
    assert [i.reference for i in payable] == ["before", "r1"]


def test_working_days_skip_sundays_second_and_fourth_saturdays_and_holidays():
    cal = HolidayCalendar.default()
    assert cal.next_working_day(date(2026, 3, 2)) == date(2026, 3, 3)  # Mon → Tue
    assert cal.next_working_day(date(2026, 3, 3)) == date(2026, 3, 5)  # Holi on Wed 4th
    assert cal.next_working_day(date(2026, 3, 13)) == date(2026, 3, 16)  # 2nd Sat, Sun
    assert cal.next_working_day(date(2026, 3, 6)) == date(2026, 3, 7)  # 1st Sat works
    assert cal.next_working_day(date(2026, 12, 24)) == date(2026, 12, 28)  # Fri 25, 4th Sat, Sun
    assert cal.next_working_day(date(2026, 1, 23)) == date(2026, 1, 27)  # 4th Sat, Sun, R-Day


def test_a_batch_of_status_events_folds_per_payment_as_one_by_one_upserts_would():
    from datetime import UTC, date, datetime

    from settlement.recorder import _latest_per_reference

    d, at = date(2026, 12, 1), datetime(2026, 12, 1, tzinfo=UTC)
    t, later = date(2026, 11, 30), date(2026, 12, 1)
    folded = _latest_per_reference(
        [
            ("t1", "PENDING", 100, d, at, t),
            # unresolved replaces unresolved, keeps the amount and the first transaction date
            ("t1", "DEEMED", None, d, at, later),
            ("t2", "PENDING", 200, d, at, t),
            ("t2", "SETTLED", None, d, at, None),
            ("t2", "DEEMED", None, d, at, later),  # never back from a final status
            ("t3", "FAILED", 300, d, at, None),
        ]
    )
    assert folded == {
        "t1": ("DEEMED", 100, d, at, t),
        "t2": ("SETTLED", 200, d, at, t),
        "t3": ("FAILED", 300, d, at, None),
    }


# ------------------------------------------------------------------ TAT (RBI/2019-20/67)

T = date(2026, 3, 10)


def test_the_tat_is_t_plus_1_for_p2p_and_t_plus_5_for_p2m_in_calendar_days():
    from settlement.domain import TransferKind, tat_due_date

    assert tat_due_date(T, TransferKind.P2P) == date(2026, 3, 11)
    assert tat_due_date(T) == tat_due_date(T, TransferKind.P2M) == date(2026, 3, 15)
    # Calendar days, not working days: over a month's end and a Sunday alike.
    assert tat_due_date(date(2026, 2, 26)) == date(2026, 3, 3)


def test_a_reversal_by_the_due_date_owes_nothing_and_each_day_after_it_100_rupees():
    from settlement.domain import TatCase, tat_breaches

    on_time = TatCase("in-time", T, debited=True, reversed_on=date(2026, 3, 15))
    late = TatCase("late", T, debited=True, reversed_on=date(2026, 3, 18))
    assert tat_breaches([on_time], as_of=date(2026, 3, 20)) == []
    [breach] = tat_breaches([late, on_time], as_of=date(2026, 3, 20))
    assert (breach.reference, breach.due_date, breach.days_late) == ("late", date(2026, 3, 15), 3)
    assert breach.compensation_paise == 3 * 10_000
    assert breach.reversed_on == date(2026, 3, 18)  # the reversal completed the TAT


def test_an_open_breach_accrues_until_it_is_reversed_and_no_debit_owes_nothing():
    from settlement.domain import TatCase, TransferKind, tat_breaches

    open_case = TatCase("open", T, debited=True)
    assert tat_breaches([open_case], as_of=date(2026, 3, 15)) == []  # the due date itself
    [one] = tat_breaches([open_case], as_of=date(2026, 3, 16))
    assert (one.days_late, one.compensation_paise, one.reversed_on) == (1, 10_000, None)
    [four] = tat_breaches([open_case], as_of=date(2026, 3, 19))
    assert four.compensation_paise == 40_000
    never_debited = TatCase("nothing-moved", T, debited=False)
    assert tat_breaches([never_debited], as_of=date(2026, 4, 1)) == []
    p2p = TatCase("p2p", T, debited=True, kind=TransferKind.P2P)
    assert [b.days_late for b in tat_breaches([p2p], as_of=date(2026, 3, 13))] == [2]

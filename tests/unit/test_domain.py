from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidTransition
from payments.domain import FINAL_STATUSES, Payment, PaymentStatus, can_transition

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def new_payment() -> Payment:
    return Payment.initiate(
        transaction_id="UPI1",
        merchant_id="m",
        merchant_order_id="o",
        payer_vpa="success@okhdfc",
        payee_vpa="shop@okicici",
        amount_paise=100,
        at=T0,
    )


def test_happy_path_records_history_and_completion():
    p = new_payment().transition(PaymentStatus.SUBMITTED, at=T0)
    done = p.transition(PaymentStatus.SUCCESS, at=T0, response_code="00", rrn="123456789012")
    assert done.status is PaymentStatus.SUCCESS
    assert [c.status for c in done.history] == [
        PaymentStatus.INITIATED,
        PaymentStatus.SUBMITTED,
        PaymentStatus.SUCCESS,
    ]
    assert done.completed_at == T0 and done.rrn == "123456789012" and done.response_code == "00"


def test_deemed_can_end_reversed_but_success_cannot():
    p = new_payment().transition(PaymentStatus.SUBMITTED, at=T0)
    deemed = p.transition(PaymentStatus.DEEMED, at=T0, response_code="RB")
    assert deemed.transition(PaymentStatus.REVERSED, at=T0).status is PaymentStatus.REVERSED
    with pytest.raises(InvalidTransition):
        p.transition(PaymentStatus.REVERSED, at=T0)


@pytest.mark.parametrize("final", sorted(FINAL_STATUSES))
def test_final_statuses_have_no_way_out(final):
    assert not any(can_transition(final, target) for target in PaymentStatus)


def test_amount_must_be_positive():
    with pytest.raises(ValueError):
        Payment.initiate(
            transaction_id="t",
            merchant_id="m",
            merchant_order_id="o",
            payer_vpa="a@ybl",
            payee_vpa="b@ybl",
            amount_paise=0,
            at=T0,
        )


@given(st.lists(st.sampled_from(list(PaymentStatus)), max_size=12))
def test_any_sequence_reaches_at_most_one_final_status(targets):
    p = new_payment()
    for target in targets:
        try:
            p = p.transition(target, at=T0)
        except InvalidTransition:
            continue
    finals = [c for c in p.history if c.status in FINAL_STATUSES]
    assert len(finals) <= 1
    if finals:
        assert p.history[-1].status in FINAL_STATUSES

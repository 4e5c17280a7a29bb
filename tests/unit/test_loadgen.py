"""The traffic of `upi-engine load` and `bench`: valid, realistic, one payment per payer."""

from __future__ import annotations

import itertools

import pytest

from api.loadgen import Sent, percentile, traffic
from api.schemas import CreatePaymentRequest


def test_traffic_is_valid_one_payment_per_payer_and_goes_on_past_one_batch():
    bodies = list(itertools.islice(traffic(7, "run1"), 4_000))  # more than one batch
    for body in bodies:
        CreatePaymentRequest.model_validate(body)  # raises on anything the API would refuse
    assert len({b["payer_vpa"] for b in bodies}) == len(bodies)
    assert len({b["merchant_order_id"] for b in bodies}) == len(bodies)
    assert all(b["merchant_order_id"].startswith("run1-") for b in bodies)
    # Realistic: small and large amounts, most with a phone, many with a place. (About 9 %
    # of these first payments are under ₹100: since the simulator's launches bring more
    # new customers at everyday amounts, fewer than the 14 % before.)
    amounts = sorted(b["amount_paise"] for b in bodies)
    assert amounts[len(amounts) // 20] < 100_00 < 5_000_00 < amounts[-1]
    with_device = [b for b in bodies if "device" in b]
    assert len(with_device) > len(bodies) / 2
    assert any("latitude" in b["device"] for b in with_device)
    # A phone is never shared between payers (that is a mule's sign to the fraud engine).
    assert len({b["device"]["id"] for b in with_device}) == len(with_device)
    # The same seed gives the same customers; order ids follow the run.
    again = list(itertools.islice(traffic(7, "run2"), 50))
    assert [b["payer_vpa"] for b in again] == [b["payer_vpa"] for b in bodies[:50]]


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 0.5, 0.0), ([5.0], 0.99, 5.0), ([1, 2, 3, 4], 0.5, 2.5), (list(range(101)), 0.99, 99)],
)
def test_percentile(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_summary_counts_answers_not_attempts():
    sent = Sent(started=0.0, finished=2.0)
    sent.accepted = {"t1": 10.0, "t2": 30.0}
    sent.statuses.update({202: 2, 422: 1})
    sent.throttled = 4
    summary = sent.summary()
    assert summary["sent"] == 3 and summary["accepted"] == 2
    assert summary["rejected"] == {"422": 1} and summary["throttled"] == 4
    assert summary["unanswered"] == 0
    assert summary["accepted_per_second"] == 1.0 and summary["latency_p50_ms"] == 20.0

"""The dispute lifecycle, pure: what the engine records for each thing the switch's feed says,
who may answer when, and the webhook each change makes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.events import (
    DisputeAccepted,
    DisputeContested,
    DisputeOutcome,
    DisputeRaised,
    DisputeResolved,
)
from payments.disputes import DisputeStatus, Step, answerable, steps_for
from payments.npci.switch import DisputeNotice
from payments.webhooks import dispute_webhook

T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
S = DisputeStatus


def notice(status: str, *, decided_at: datetime | None = None) -> DisputeNotice:
    return DisputeNotice(
        dispute_id="DSP1",
        txn_id="UPI1",
        amount_paise=500,
        reason="goods_not_received",
        raised_at=T0,
        respond_by=T0 + timedelta(days=5),
        status=status,
        changed_at=decided_at or T0,
        payer_bank="HDFC",
        payee_bank="ICICI",
        decided_at=decided_at,
    )


def test_a_new_complaint_is_recorded_open_and_a_repeat_changes_nothing():
    assert steps_for(None, notice("OPEN")) == [Step(S.OPEN, T0)]
    assert steps_for(S.OPEN, notice("OPEN")) == []


def test_a_complaint_first_seen_closed_is_recorded_with_every_step():
    at = T0 + timedelta(days=5)
    assert steps_for(None, notice("ACCEPTED", decided_at=at)) == [
        Step(S.OPEN, T0),
        Step(S.ACCEPTED, at, auto=True),
    ]
    assert steps_for(None, notice("LOST", decided_at=at)) == [Step(S.OPEN, T0), Step(S.LOST, at)]


@pytest.mark.parametrize("outcome", [S.WON, S.LOST])
def test_the_switch_decides_a_contested_dispute(outcome):
    at = T0 + timedelta(days=2)
    assert steps_for(S.CONTESTED, notice(outcome.value, decided_at=at)) == [Step(outcome, at)]


def test_a_deemed_acceptance_wins_over_an_open_or_late_contested_dispute():
    at = T0 + timedelta(days=5)
    for ours in (S.OPEN, S.CONTESTED):
        assert steps_for(ours, notice("ACCEPTED", decided_at=at)) == [
            Step(S.ACCEPTED, at, auto=True)
        ]


def test_our_answer_on_its_way_and_closed_disputes_change_nothing():
    assert steps_for(S.CONTESTED, notice("OPEN")) == []  # the contest is not delivered yet
    assert steps_for(S.ACCEPTED, notice("OPEN")) == []
    for closed in (S.ACCEPTED, S.WON, S.LOST):
        for seen in ("OPEN", "ACCEPTED", "CONTESTED", "WON", "LOST"):
            assert steps_for(closed, notice(seen, decided_at=T0)) == []


def test_who_may_answer_when():
    by = T0 + timedelta(days=5)
    assert answerable(S.OPEN, by, T0, contest=True) is None
    assert answerable(S.OPEN, by, by, contest=True) == "dispute_overdue"
    assert (
        answerable(S.OPEN, by, by, contest=False) is None
    )  # accepting late is what happens anyway
    for status in (S.ACCEPTED, S.CONTESTED, S.WON, S.LOST):
        assert answerable(status, by, T0, contest=False) == "dispute_not_open"


def test_each_change_names_its_webhook_and_shows_the_dispute_as_it_left_it():
    view = {"dispute_id": "DSP1", "status": "LOST", "chargeback": True}
    common = {"transaction_id": "UPI1", "merchant_id": "m", "dispute_id": "DSP1", "amount_paise": 5}
    banks = {"payer_bank": "HDFC", "payee_bank": "ICICI"}
    cases = [
        (
            DisputeRaised(**common, reason="x", raised_at=T0, respond_by=T0),
            "dispute.opened",
            "OPEN",
        ),
        (
            DisputeContested(**common, documents=1, contested_at=T0),
            "dispute.contested",
            "CONTESTED",
        ),
        (
            DisputeAccepted(**common, **banks, auto=True, accepted_at=T0),
            "dispute.accepted",
            "ACCEPTED",
        ),
        (
            DisputeResolved(**common, **banks, outcome=DisputeOutcome.WON, resolved_at=T0),
            "dispute.won",
            "WON",
        ),
        (
            DisputeResolved(**common, **banks, outcome=DisputeOutcome.LOST, resolved_at=T0),
            "dispute.lost",
            "LOST",
        ),
    ]
    for event, name, status in cases:
        got, body = dispute_webhook(event, view)
        assert (got, body["event"], body["dispute"]["status"]) == (name, name, status)
        assert body["dispute"]["chargeback"] is (status in ("ACCEPTED", "LOST"))

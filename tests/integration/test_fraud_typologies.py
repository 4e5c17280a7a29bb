"""Issue 18's typologies through the fraud consumer and the real PostgreSQL, where the API
cannot drive them in a test's time (the payments' own initiation times make the windows,
so events dated hours apart are all it takes): a slow mule ring spread over hours and a
new shop's first customers; ordinary lives with hours in them: a shop owner's morning of
suppliers, a family of three sharing one phone, a flight with the airport and a cab, a
festival stall paid by the locals."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta

import pytest

from core.clock import FakeClock
from core.config import Settings
from core.crypto import MasterKey
from core.events import CATALOGUE, DeviceInfo, Envelope, FraudAssessed, PaymentInitiated
from core.pii import Vpa, unkeyed_partition_key
from fraud.assessor import FraudAssessor
from fraud.cities import CITIES
from tests.integration.test_fraud_store import decisions as decided

pytestmark = pytest.mark.postgres

KEY = MasterKey(os.urandom(32))
T0 = datetime(2026, 10, 20, 9, 0, tzinfo=UTC)


def initiated(
    n: int,
    payer: str,
    payee: str,
    amount: int,
    at: datetime,
    city: str,
    device: str | None = None,
) -> Envelope:
    lat, lon = CITIES[city]
    event = PaymentInitiated(
        transaction_id=f"UPI{n:012d}",
        merchant_id="mer_1",
        merchant_order_id=f"o{n}",
        payer_vpa=Vpa(payer),
        payee_vpa=Vpa(payee),
        amount_paise=amount,
        device=DeviceInfo(id=device or f"phone-{payer}", latitude=lat, longitude=lon),
        initiated_at=at,
    )
    return Envelope.wrap(event, partition_key=unkeyed_partition_key(payer), occurred_at=at)


async def assess_all(db, envelopes: list[Envelope]) -> list[FraudAssessed]:
    """Handled one by one in time order; their decisions, in the given order."""
    assessor = FraudAssessor.from_settings(Settings(), db, KEY, FakeClock(T0 + timedelta(days=9)))
    try:
        for envelope in sorted(envelopes, key=lambda e: e.occurred_at):
            await assessor.handle(envelope)
    finally:
        assessor.close()
    found = await decided(db)
    return [found[CATALOGUE.decode_as(e, PaymentInitiated).transaction_id] for e in envelopes]


async def test_ordinary_lives_with_hours_in_them_are_allowed(db):
    rng = random.Random(23)
    at = T0
    events: list[Envelope] = []
    n = 1_000

    def pay(payer: str, payee: str, amount: int, when: datetime, city: str, device=None) -> None:
        nonlocal n
        n += 1
        events.append(initiated(n, payer, payee, amount, when, city, device))

    # Everyone has a week of everyday payments at shops the town has known for months.
    regulars = ["owner@oksbi", "amma@okicici", "ravi@okicici", "meena@okicici", "flyer@okaxis"]
    regulars += [f"local{i}@ybl" for i in range(10)]
    for day in range(7):
        for k, payer in enumerate(regulars):
            when = at + timedelta(days=day, hours=2 + k * 0.5, minutes=rng.uniform(0, 20))
            device = (
                "family-phone"
                if payer in ("amma@okicici", "ravi@okicici", "meena@okicici")
                else None
            )
            amount = 2_50_000 if payer == "owner@oksbi" else rng.randint(100, 2_000) * 100
            pay(payer, f"shop{k % 4}@okhdfc", amount, when, "Pune", device)
    day8 = at + timedelta(days=8)
    checked_from = len(events)
    # The shop owner's morning: seven suppliers, some new, 5-20 minutes apart.
    for i in range(7):
        when = day8 + timedelta(minutes=12 * i + rng.uniform(0, 5))
        amount = rng.choice([1_80_000, 2_50_000, 3_25_000, 4_00_000])
        pay("owner@oksbi", f"supplier{i % 5}@ybl", amount, when, "Pune")
    # The family's phone: three of them, over the day.
    for i, payer in enumerate(["amma@okicici", "ravi@okicici", "meena@okicici"] * 2):
        pay(
            payer,
            f"shop{i % 4}@okhdfc",
            rng.randint(100, 3_000) * 100,
            day8 + timedelta(hours=1 + 1.5 * i),
            "Pune",
            "family-phone",
        )
    # A flight: the airport café in Pune, a cab in Delhi three hours later, a hotel.
    pay("flyer@okaxis", "airport.cafe@okhdfc", 45_000, day8 + timedelta(hours=5), "Pune")
    pay("flyer@okaxis", "cab.delhi@ybl", 1_20_000, day8 + timedelta(hours=8), "Delhi")
    pay("flyer@okaxis", "hotel.delhi@okicici", 6_50_000, day8 + timedelta(hours=9), "Delhi")
    # Diwali: a pop-up stall nobody paid before, the locals within half an hour.
    for i in range(10):
        when = day8 + timedelta(hours=11, minutes=3 * i)
        pay(f"local{i}@ybl", "diya.stall@ybl", rng.randint(50, 1_500) * 100, when, "Pune")
    decisions = await assess_all(db, events)
    flagged = [
        (CATALOGUE.decode_as(e, PaymentInitiated).payee_vpa.value, d.score, d.reasons)
        for e, d in zip(events[checked_from:], decisions[checked_from:], strict=True)
        if d.decision.value != "ALLOW"
    ]
    assert flagged == []


async def test_a_slow_mule_ring_over_hours_is_caught_and_a_new_shop_is_not(db):
    rng = random.Random(18)
    cities = list(CITIES)
    ring, shop = [], []
    # Fifteen fresh VPAs in as many cities pay one fresh pool account over five hours,
    # three an hour, just under ₹10,000 / ₹50,000.
    for i in range(15):
        at = T0 + timedelta(minutes=20 * i + rng.uniform(0, 5))
        amount = rng.choice([9_999_00, 9_990_00, 49_990_00, 49_999_00])
        ring.append(initiated(i, f"mule{i}@ybl", "pool77@ybl", amount, at, rng.choice(cities)))
    # A tea shop opens the same morning: locals, new ones among them, small amounts.
    for i in range(15):
        at = T0 + timedelta(minutes=20 * i + rng.uniform(0, 5))
        amount = rng.randint(20, 400) * 100
        shop.append(initiated(100 + i, f"local{i}@okicici", "chai.corner@ybl", amount, at, "Pune"))
    decisions = await assess_all(db, [*ring, *shop])
    mules, customers = decisions[: len(ring)], decisions[len(ring) :]
    caught = [d for d in mules[2:] if d.decision.value in ("STEP_UP", "BLOCK")]
    assert len(caught) == len(mules) - 2, [(d.decision, d.reasons) for d in mules]
    assert any("PAYEE_NEW_FAN_IN_SLOW" in d.reasons for d in caught)
    assert any("AMOUNT_STRUCTURING" in d.reasons for d in caught)
    # The explanation the ledger keeps: which scorer said what.
    assert any("PAYEE_NEW_FAN_IN_SLOW" in d.contributions["velocity"].reasons for d in caught)
    assert all(d.decision.value == "ALLOW" for d in customers), [
        (d.score, d.reasons) for d in customers
    ]

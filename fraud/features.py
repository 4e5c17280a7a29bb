"""The features of a payment, from the payment and what is known of its payer, device and
payee before it. Pure. The same code computes them for training (simulated traffic) and
for scoring (live history), so the model sees the same numbers in both.

The payee's plain fan-in (distinct payers in the last hour) is in the history, for the
velocity rule, but not a model feature: in merchant collections a popular shop is paid by
hundreds of payers an hour, and a model taught on it learns the size of the shop, not
fraud. What the model does see of the payee is what tells a mule's collecting account
from a shop: how long the engine has known the payee (its *age*: a mule VPA is hours
old, a shop months), how many distinct payers reached it in the last minutes, and how
many of those were paying for the first time anywhere (mule rings are fresh VPAs). With
them, on the payer's side, amounts structured just under a round limit
(:func:`structuring_gap`), and on the device's side how many payers shared the phone in
the last minutes and how many phones the payer used in a day.

For bursts and collect-request scams: how long since the payer's previous payment and
how often it paid this payee in the last minutes, the amount against the payer's usual
(the geometric mean of its amounts, :func:`log_amount_vs_usual`), and, for a payee younger
than a day, how many of its payers so far paid it far above their own usual
(:func:`large_vs_usual`: a scammer's victims each pay far more than they usually do) and
what share of them paid structured sums (a mule's collector is paid such sums; a new
shop's price point is one amount among many).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "FEATURE_NAMES",
    "ROUND_LIMITS_PAISE",
    "History",
    "Txn",
    "feature_vector",
    "haversine_km",
    "payee_age_s",
    "structuring_gap",
]

EARTH_RADIUS_KM = 6371.0088
# Round limits people structure payments under: bank and app limits, reporting habits
# (₹10,000, ₹50,000, ₹1 lakh ...). A payment just under one is ``amount_structured``.
ROUND_LIMITS_PAISE = (
    5_000_00,
    10_000_00,
    20_000_00,
    25_000_00,
    50_000_00,
    1_00_000_00,
    2_00_000_00,
)
STRUCTURING_BAND = 0.03  # within 3 % below the limit (₹9,700-₹9,999.99 under ₹10,000)


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


@dataclass(frozen=True)
class Txn:
    payer: str
    payee: str
    amount_paise: int
    at: datetime
    device_id: str | None = None
    location: tuple[float, float] | None = None
    emulator: bool = False
    rooted: bool = False


@dataclass(frozen=True)
class History:
    """What was known before the payment (windows end at the payment's time)."""

    payer_count_1m: int = 0
    payer_count_1h: int = 0
    payer_count_24h: int = 0
    payer_amount_1h: int = 0
    payer_amount_24h: int = 0
    payer_payments_ever: int = 0
    payer_median_amount: int = 0
    device_count_1h: int = 0
    device_vpas_24h: int = 0  # distinct payers seen on this device
    payee_count_1h: int = 0
    payee_payers_1h: int = 0  # distinct payers paying this payee
    device_known_for_payer: bool = False
    payer_devices_ever: int = 0
    seconds_since_device_change: float | None = None
    last_location: tuple[float, float] | None = None
    seconds_since_last: float | None = None
    usual_places: tuple[tuple[float, float], ...] = field(default=())
    # Payee and device side (issue 18): the payee's first payment seen by the engine, its
    # distinct payers in the last 10 minutes and how many of them were paying for the
    # first time anywhere (in 10 min and 1 h), other payers on the device in 10 minutes,
    # the payer's distinct devices in 24 h.
    payee_first_seen_s: float | None = None  # seconds since; None: never paid before
    payee_payers_10m: int = 0
    payee_new_payers_10m: int = 0
    payee_new_payers_1h: int = 0
    device_payers_10m: int = 0  # other payers seen on this device
    payer_devices_24h: int = 0
    # Bursts and collect requests (issue 18): how long since the payer's previous payment
    # (within 24 h), the payer's earlier payments to this payee in 10 minutes, and, for a
    # payee first paid less than a day ago, its distinct payers so far and those who paid
    # it well above their usual (:func:`large_vs_usual`, recorded with each payment);
    # 0 for an older payee.
    seconds_since_prev: float | None = None
    payer_to_payee_10m: int = 0
    young_payee_payers: int = 0
    young_payee_large_payers: int = 0
    payer_milli_log_sum: int = 0  # the payer's amounts' milli_log, summed (their usual)
    # Of the payee's payers in 10 min and in the hour, those who paid it a structured
    # amount (:func:`structuring_gap`): a mule's collector is paid structured sums, a
    # shop's price just under a round figure is one product among its many.
    payee_structured_payers_10m: int = 0
    payee_structured_payers_1h: int = 0


FEATURE_NAMES = (
    "log_amount",
    "amount_vs_median",
    "payer_count_1m",
    "payer_count_1h",
    "payer_count_24h",
    "log_payer_amount_24h",
    "new_payer",
    "device_count_1h",
    "device_vpas_24h",
    "device_new_for_payer",
    "payer_devices_ever",
    "recent_device_change",
    "implied_speed_kmh",
    "km_from_usual",
    "emulator_or_rooted",
    "round_amount",
    "payee_age_h",
    "payee_never_paid",
    "payee_payers_10m",
    "payee_new_payers_10m",
    "payee_new_share_10m",
    "payee_new_payers_1h",
    "amount_structured",
    "device_payers_10m",
    "payer_devices_24h",
    "young_payee_payers_1h",
    "log_seconds_since_prev",
    "payer_to_payee_10m",
    "young_payee_large_payers",
    "log_amount_vs_usual",
    "young_payee_structured_share_1h",
)
PAYEE_AGE_CAP_H = 24.0 * 30  # older than a month is simply old


def implied_speed_kmh(txn: Txn, history: History) -> float:
    if txn.location is None or history.last_location is None or history.seconds_since_last is None:
        return 0.0
    km = haversine_km(txn.location, history.last_location)
    hours = max(history.seconds_since_last, 60.0) / 3600  # a minute's grace for GPS noise
    return km / hours


def km_from_usual(txn: Txn, history: History) -> float:
    if txn.location is None or not history.usual_places:
        return 0.0
    return min(haversine_km(txn.location, place) for place in history.usual_places)


def payee_age_s(history: History) -> float | None:
    """How long the engine has known the payee, or None if it was never paid before."""
    seen = history.payee_first_seen_s
    return None if seen is None else max(seen, 0.0)


def structuring_gap(amount_paise: int) -> float | None:
    """How far below the nearest round limit the amount is, as a share of the limit, when
    it is within :data:`STRUCTURING_BAND` below one (and not the limit itself); else None.
    ₹9,999 → 0.0001 under ₹10,000; ₹9,500 → None."""
    for limit in ROUND_LIMITS_PAISE:
        if limit * (1 - STRUCTURING_BAND) <= amount_paise < limit:
            return (limit - amount_paise) / limit
    return None


# A payment *well above the payer's usual*: at least 3x the geometric mean of the payer's
# amounts so far, and at least Rs 1,000. The geometric mean is kept as an integer sum of
# milli-decades (round(1000 * log10 amount)) per payer, so every copy of the history (in
# memory, in PostgreSQL) gets the same flag to the paisa.
LARGE_VS_USUAL_MILLI = 477  # round(1000 * log10(3))
LARGE_MIN_PAISE = 1_000_00


def milli_log(amount_paise: int) -> int:
    """round(1000 * log10(amount)): what a payer's usual amount is summed in."""
    return round(1000 * math.log10(max(amount_paise, 1)))


def large_vs_usual(amount_paise: int, payments: int, milli_log_sum: int) -> bool:
    """Whether a payment of ``amount_paise`` is well above the usual of a payer who made
    ``payments`` before it, their amounts' :func:`milli_log` summing to ``milli_log_sum``
    (a payer without payments has no usual)."""
    return (
        payments > 0
        and amount_paise >= LARGE_MIN_PAISE
        and milli_log(amount_paise) * payments >= milli_log_sum + LARGE_VS_USUAL_MILLI * payments
    )


def log_amount_vs_usual(amount_paise: int, history: History) -> float:
    """log10 of the amount over the payer's usual (geometric mean); 0 without a usual."""
    n = history.payer_payments_ever
    return (milli_log(amount_paise) - history.payer_milli_log_sum / n) / 1000 if n else 0.0


def feature_vector(txn: Txn, history: History) -> list[float]:
    median = max(history.payer_median_amount, 1)
    device_change = history.seconds_since_device_change
    return [
        math.log10(max(txn.amount_paise, 1)),
        txn.amount_paise / median if history.payer_payments_ever else 1.0,
        float(history.payer_count_1m),
        float(history.payer_count_1h),
        float(history.payer_count_24h),
        math.log10(history.payer_amount_24h + 1),
        1.0 if history.payer_payments_ever == 0 else 0.0,
        float(history.device_count_1h),
        float(history.device_vpas_24h),
        1.0
        if txn.device_id and not history.device_known_for_payer and history.payer_payments_ever > 0
        else 0.0,
        float(history.payer_devices_ever),
        1.0 if device_change is not None and device_change < 6 * 3600 else 0.0,
        min(implied_speed_kmh(txn, history), 20_000.0),
        min(km_from_usual(txn, history), 5_000.0),
        1.0 if txn.emulator or txn.rooted else 0.0,
        1.0 if txn.amount_paise % 100_000 == 0 else 0.0,
        min(age / 3600, PAYEE_AGE_CAP_H) if (age := payee_age_s(history)) is not None else 0.0,
        1.0 if history.payee_first_seen_s is None else 0.0,
        float(history.payee_payers_10m),
        float(history.payee_new_payers_10m),
        history.payee_new_payers_10m / history.payee_payers_10m
        if history.payee_payers_10m
        else 0.0,
        float(history.payee_new_payers_1h),
        1.0 if structuring_gap(txn.amount_paise) is not None else 0.0,
        float(history.device_payers_10m),
        float(history.payer_devices_24h),
        # The hour's distinct payers, for a payee younger than a day only: for a shop it
        # measures the shop's size (see the module's docstring), for a day-old VPA a ring.
        float(history.payee_payers_1h) if (age or 0.0) < 86_400 else 0.0,
        math.log10(1 + min(max(prev, 0.0), 86_400.0))
        if (prev := history.seconds_since_prev) is not None
        else math.log10(1 + 86_400.0),
        float(history.payer_to_payee_10m),
        float(history.young_payee_large_payers),
        log_amount_vs_usual(txn.amount_paise, history),
        history.payee_structured_payers_1h / history.payee_payers_1h
        if history.payee_payers_1h and (age or 0.0) < 86_400
        else 0.0,
    ]

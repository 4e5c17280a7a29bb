"""The features of a payment, from the payment and what is known of its payer, device and
payee before it. Pure. The same code computes them for training (simulated traffic) and
for scoring (live history), so the model sees the same numbers in both.

The payee's fan-in (distinct payers in the last hour) is in the history, for the velocity
rule, but not a model feature: in merchant collections a popular shop is paid by hundreds
of new payers an hour, and a model taught on it learns the size of the shop, not fraud.
Mule rings show instead in devices shared by many VPAs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["FEATURE_NAMES", "History", "Txn", "feature_vector", "haversine_km"]

EARTH_RADIUS_KM = 6371.0088


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
)


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
    ]

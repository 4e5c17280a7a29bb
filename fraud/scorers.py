"""The four fraud scorers. Each one looks at a payment and its history and returns a
:class:`Signal`: a risk score in [0, 1] and the reason codes behind it. They are pure and
synchronous; :mod:`fraud.engine` runs them concurrently, each within its own time budget.

* :class:`VelocityScorer`: counts and amounts in sliding windows (1 min, 1 h, 24 h) per
  payer, per device and per payee; a young payee reached by many payers new to the engine
  within minutes or within the hour, most of them paying structured sums (a mule's
  collecting account); amounts structured just under a round limit, towards a young
  payee; a young payee paid far above their usual by several customers the engine knows
  (collect requests approved for a "refund").
* :class:`LocationScorer`: impossible travel (haversine distance over elapsed time against a
  plausible top speed) and distance from the payer's usual places.
* :class:`DeviceScorer`: a device new to an established payer, one device used by many VPAs
  (mule) within minutes (a device farm) or within a day, a payer hopping devices, a device
  change right before a high-value payment (SIM swap / takeover), emulator
  or rooted flags. A payer's very first payment on a steady device scores 0.
* :class:`ModelScorer`: the scikit-learn model over :data:`fraud.features.FEATURE_NAMES`.

A scorer may also have ``score_batch(txns, histories)``, the same signals for many payments
at once (:class:`BatchScorer`): the model has one, vectorised; the rules are scored in a
loop (:func:`score_each`).

Inside a scorer several rules combine by noisy-OR (:func:`noisy_or`), like the scorers do in
:mod:`fraud.combiner`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fraud.features import (
    History,
    Txn,
    feature_vector,
    haversine_km,
    implied_speed_kmh,
    km_from_usual,
    large_vs_usual,
    payee_age_s,
    structuring_gap,
)

if TYPE_CHECKING:
    from fraud.model import CompiledTrees

__all__ = [
    "BatchScorer",
    "DeviceRules",
    "DeviceScorer",
    "LocationRules",
    "LocationScorer",
    "ModelScorer",
    "Scorer",
    "Signal",
    "VelocityRules",
    "VelocityScorer",
    "model_signal",
    "noisy_or",
    "score_each",
]


@dataclass(frozen=True)
class Signal:
    score: float
    reasons: tuple[str, ...] = ()


NOTHING = Signal(0.0)


class Scorer(Protocol):
    name: str

    def score(self, txn: Txn, history: History) -> Signal: ...


@runtime_checkable
class BatchScorer(Scorer, Protocol):
    def score_batch(self, txns: Sequence[Txn], histories: Sequence[History]) -> list[Signal]:
        """``[score(t, h) for t, h in zip(txns, histories)]``, the same signals, faster."""
        ...


def score_each(
    scorer: Scorer, txns: Sequence[Txn], histories: Sequence[History]
) -> list[Signal | BaseException]:
    """Each payment's signal, or the error the scorer raised for it (the others still
    count). One call scores a whole batch, so it runs as one job on the engine's pool. A
    :class:`BatchScorer` scores them all at once: what it raises is raised for all."""
    if isinstance(scorer, BatchScorer):
        return list(scorer.score_batch(txns, histories))
    out: list[Signal | BaseException] = []
    for txn, history in zip(txns, histories, strict=True):
        try:
            out.append(scorer.score(txn, history))
        except Exception as exc:
            out.append(exc)
    return out


def noisy_or(scores: Iterable[float]) -> float:
    """1 - Π(1 - s): independent pieces of evidence, each enough on its own to its degree."""
    keep = 1.0
    for s in scores:
        keep *= 1.0 - min(max(s, 0.0), 1.0)
    return 1.0 - keep


def _combine(hits: list[tuple[str, float]]) -> Signal:
    if not hits:
        return NOTHING
    return Signal(round(noisy_or(s for _, s in hits), 6), tuple(code for code, _ in hits))


def _ramp(value: float, start: float, full: float, low: float, high: float) -> float:
    """``low`` at ``start``, rising linearly to ``high`` at ``full`` and beyond."""
    if full <= start:
        return high
    t = min(max((value - start) / (full - start), 0.0), 1.0)
    return low + (high - low) * t


# --------------------------------------------------------------------------- velocity


@dataclass(frozen=True)
class VelocityRules:
    payer_per_minute: int = 3  # earlier payments in the last minute that start a burst
    payer_per_hour: int = 15
    payer_per_day: int = 40
    payer_amount_per_day_paise: int = 2_00_000_00  # ₹2,00,000 including this payment
    device_per_hour: int = 15
    payee_payers_per_hour: int = 30  # distinct payers: a fan-in, but merchants have many
    # A payee the engine has known for less than this is *young*: a mule's collecting VPA
    # is opened for the scam; a shop has been paid for weeks.
    young_payee_s: float = 24 * 3600
    young_payee_new_payers_10m: int = 2  # payers new to the engine, in 10 min, most of them
    young_payee_new_payers_1h: int = 3  # ... or in its hour (a slow ring: a few an hour)
    # A collect-request scam: a young payee whose payers so far paid it well above their
    # usual (fraud.features.large_vs_usual), at least this many of them and at least half
    # of all its payers, this payment far above its payer's usual too.
    young_payee_large_payers: int = 2


class VelocityScorer:
    name = "velocity"

    def __init__(self, rules: VelocityRules | None = None) -> None:
        self.rules = rules or VelocityRules()

    def score(self, txn: Txn, history: History) -> Signal:
        r = self.rules
        hits: list[tuple[str, float]] = []
        if history.payer_count_1m >= r.payer_per_minute:
            n = history.payer_count_1m
            hits.append(
                (
                    "VELOCITY_PAYER_1M",
                    _ramp(n, r.payer_per_minute, 3 * r.payer_per_minute, 0.5, 0.9),
                )
            )
        if history.payer_count_1h >= r.payer_per_hour:
            n = history.payer_count_1h
            hits.append(
                ("VELOCITY_PAYER_1H", _ramp(n, r.payer_per_hour, 3 * r.payer_per_hour, 0.4, 0.8))
            )
        if history.payer_count_24h >= r.payer_per_day:
            hits.append(("VELOCITY_PAYER_24H", 0.3))
        if history.payer_amount_24h + txn.amount_paise >= r.payer_amount_per_day_paise:
            hits.append(("VELOCITY_AMOUNT_24H", 0.25))
        if history.device_count_1h >= r.device_per_hour:
            n = history.device_count_1h
            hits.append(
                ("VELOCITY_DEVICE_1H", _ramp(n, r.device_per_hour, 3 * r.device_per_hour, 0.4, 0.8))
            )
        if history.payee_payers_1h >= r.payee_payers_per_hour:
            # Alone, not enough: a popular merchant is paid by many people every hour.
            hits.append(("VELOCITY_PAYEE_FAN_IN", 0.1))
        age = payee_age_s(history)
        young = age is None or age < r.young_payee_s
        new_10m, new_1h = history.payee_new_payers_10m, history.payee_new_payers_1h
        # A sum structured under a limit: a merchant's first day here, its customers new
        # to the engine too, is the same fan-in, but of purchases (any sizeable mule sum
        # unstructured is left to the model, which sees the amounts and the cities).
        structured = structuring_gap(txn.amount_paise) is not None
        # Mostly payers paying for the first time anywhere: fresh VPAs, a mule ring, in
        # 10 minutes or (a slow ring) in the hour. A festival stall is as young and as
        # busy, but paid by people the engine knows.
        # And mostly structured sums among its payers: a mule's collector is paid such
        # sums, a new shop's price just under a round figure (₹9,999) is one of its many.
        windows = (
            (
                "PAYEE_NEW_FAN_IN",
                new_10m,
                history.payee_payers_10m,
                history.payee_structured_payers_10m,
                r.young_payee_new_payers_10m,
            ),
            (
                "PAYEE_NEW_FAN_IN_SLOW",
                new_1h,
                history.payee_payers_1h,
                history.payee_structured_payers_1h,
                r.young_payee_new_payers_1h,
            ),
        )
        for code, new, payers, structured_payers, start in windows if young and structured else ():
            if new >= start and 2 * new >= payers and 2 * structured_payers >= payers:
                slow = code == "PAYEE_NEW_FAN_IN_SLOW"
                full, top = (3 * start, 0.7) if slow else (4 * start, 0.8)
                hits.append((code, _ramp(new, start, full, 0.3, top)))
                break
        if young and structured:
            # Just under a round limit, to an account nobody paid a day ago.
            hits.append(("AMOUNT_STRUCTURING", 0.15))
        large = history.young_payee_large_payers
        if (
            young
            and large >= r.young_payee_large_payers
            and 2 * large >= history.young_payee_payers
            and large_vs_usual(
                txn.amount_paise, history.payer_payments_ever, history.payer_milli_log_sum
            )
        ):
            # Customers the engine knows, each paying a day-old account far more than
            # they usually pay: collect requests approved for a "refund" or a "prize".
            start = r.young_payee_large_payers
            hits.append(("PAYEE_YOUNG_LARGE_FAN_IN", _ramp(large, start, 3 * start, 0.35, 0.75)))
        return _combine(hits)


# --------------------------------------------------------------------------- location


@dataclass(frozen=True)
class LocationRules:
    top_speed_kmh: float = 900.0  # a domestic flight, door to door, is slower than this
    min_jump_km: float = 150.0  # GPS and IP geolocation are coarse: ignore short hops
    far_from_usual_km: float = 800.0
    established_after: int = 5  # payments before the usual places mean something


class LocationScorer:
    name = "location"

    def __init__(self, rules: LocationRules | None = None) -> None:
        self.rules = rules or LocationRules()

    def score(self, txn: Txn, history: History) -> Signal:
        r = self.rules
        hits: list[tuple[str, float]] = []
        speed = implied_speed_kmh(txn, history)
        if (
            speed > r.top_speed_kmh
            and txn.location
            and history.last_location
            and haversine_km(txn.location, history.last_location) >= r.min_jump_km
        ):
            hits.append(
                (
                    "IMPOSSIBLE_TRAVEL",
                    _ramp(speed, r.top_speed_kmh, 5 * r.top_speed_kmh, 0.6, 0.85),
                )
            )
        if history.payer_payments_ever >= r.established_after:
            km = km_from_usual(txn, history)
            if km >= r.far_from_usual_km:
                hits.append(("FAR_FROM_USUAL_PLACES", 0.2))
        return _combine(hits)


# --------------------------------------------------------------------------- device


@dataclass(frozen=True)
class DeviceRules:
    # Other VPAs seen on this device in 24 h: a mule device. A family of four sharing one
    # phone is three others; a device farm is many more.
    shared_by_payers: int = 4
    shared_within_minutes: int = 2  # other VPAs on it in 10 min: a device farm
    devices_per_day: int = 3  # distinct devices the payer used in 24 h, before this one
    high_value_paise: int = 5_000_00  # ₹5,000 ...
    high_value_vs_median: float = 5.0  # ... and five times the payer's usual amount
    recent_change_s: float = 6 * 3600


class DeviceScorer:
    name = "device"

    def __init__(self, rules: DeviceRules | None = None) -> None:
        self.rules = rules or DeviceRules()

    def _high_value(self, txn: Txn, history: History) -> bool:
        usual = max(history.payer_median_amount, 1)
        return (
            txn.amount_paise >= self.rules.high_value_paise
            and txn.amount_paise >= self.rules.high_value_vs_median * usual
        )

    def score(self, txn: Txn, history: History) -> Signal:
        r = self.rules
        hits: list[tuple[str, float]] = []
        if txn.emulator:
            hits.append(("DEVICE_EMULATOR", 0.45))
        if txn.rooted:
            hits.append(("DEVICE_ROOTED", 0.25))
        if txn.device_id is None:
            return _combine(hits)
        if history.device_payers_10m >= r.shared_within_minutes:
            n = history.device_payers_10m
            start = r.shared_within_minutes
            hits.append(("DEVICE_SHARED", _ramp(n, start, 4 * start, 0.5, 0.85)))
        elif history.device_vpas_24h >= r.shared_by_payers:
            n = history.device_vpas_24h
            hits.append(
                (
                    "DEVICE_SHARED_BY_MANY_VPAS",
                    _ramp(n, r.shared_by_payers, 4 * r.shared_by_payers, 0.5, 0.85),
                )
            )
        if history.payer_devices_24h >= r.devices_per_day and not history.device_known_for_payer:
            hits.append(("PAYER_MANY_DEVICES", 0.3))
        established = history.payer_payments_ever > 0
        new_here = established and not history.device_known_for_payer
        high_value = established and self._high_value(txn, history)
        if new_here and high_value:
            hits.append(("DEVICE_CHANGE_BEFORE_HIGH_VALUE", 0.65))
        elif new_here:
            hits.append(("DEVICE_NEW_FOR_PAYER", 0.15))
        elif (
            high_value
            and history.seconds_since_device_change is not None
            and history.seconds_since_device_change < r.recent_change_s
        ):
            hits.append(("SIM_SWAP_PATTERN", 0.6))
        return _combine(hits)


# --------------------------------------------------------------------------- model


def model_signal(proba: float, threshold: float = 0.5) -> Signal:
    """The model's fraud probability as a signal (also for batch-scored evaluation)."""
    return Signal(round(proba, 6), ("MODEL_HIGH_RISK",) if proba >= threshold else ())


class ModelScorer:
    """The trained model (:mod:`fraud.model`): its fraud probability is the score."""

    name = "model"

    def __init__(self, trees: CompiledTrees, version: str, threshold: float = 0.5) -> None:
        self._trees = trees
        self.version = version
        self.threshold = threshold

    def score(self, txn: Txn, history: History) -> Signal:
        return model_signal(self._trees.predict_one(feature_vector(txn, history)), self.threshold)

    def score_batch(self, txns: Sequence[Txn], histories: Sequence[History]) -> list[Signal]:
        vectors = [feature_vector(t, h) for t, h in zip(txns, histories, strict=True)]
        return [model_signal(p, self.threshold) for p in self._trees.predict_many(vectors)]

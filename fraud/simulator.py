"""A simulator of UPI traffic with fraud typologies: the data the model is trained and
evaluated on (documented in ``docs/fraud.md``). Deterministic for a seed.

Ordinary payers live in an Indian city (:data:`fraud.cities.CITIES`), pay from one phone
(some change phones, a few are rooted), mostly merchants (a few very popular ones take
hundreds of payers an hour) and sometimes friends, with amounts around their own typical
amount; some split bills in quick succession, make a large purchase, or fly to another
city. Fraud comes as incidents of six typologies:

``account_takeover``
    an attacker's device pays a victim's money out, many times the victim's usual amount,
    from anywhere, within minutes;
``sim_swap``
    the victim's number moves to a new device, a tiny probe payment follows, then within
    two hours large payments from the victim's own city;
``mule_fan_in``
    a ring of new mule VPAs, run from two or three shared phones, pays a collector account
    just under round limits within an hour;
``velocity_burst``
    malware on the victim's own phone makes a burst of payments within minutes;
``impossible_travel``
    cloned credentials pay from a city far away minutes after the victim paid at home,
    half the time with the victim's device id spoofed;
``merchant_collusion``
    a handful of payers, often on emulators, pay a colluding shop round amounts again and
    again within an hour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fraud.cities import CITIES
from fraud.features import Txn, feature_vector, haversine_km
from fraud.history import HistoryTracker

__all__ = ["TYPOLOGIES", "LabelledTxn", "featurise", "simulate"]

TYPOLOGIES = (
    "account_takeover",
    "sim_swap",
    "mule_fan_in",
    "velocity_burst",
    "impossible_travel",
    "merchant_collusion",
)
START = datetime(2026, 1, 5, tzinfo=UTC)
_CITY_NAMES = tuple(CITIES)
# Metros first in the list: weigh them more.
_CITY_WEIGHTS = tuple(6.0 if i < 8 else 1.5 for i in range(len(_CITY_NAMES)))
_HANDLES = ("okhdfc", "okicici", "oksbi", "okaxis", "ybl", "paytm")


@dataclass(frozen=True)
class LabelledTxn:
    txn: Txn
    fraud: bool
    typology: str  # "legit" or one of TYPOLOGIES


def _near(rng: random.Random, city: str, spread: float = 0.08) -> tuple[float, float]:
    lat, lon = CITIES[city]
    return (
        round(lat + rng.uniform(-spread, spread), 5),
        round(lon + rng.uniform(-spread, spread), 5),
    )


def _amount(rng: random.Random, median_paise: int, sigma: float = 0.6) -> int:
    value = int(median_paise * math.exp(rng.gauss(0, sigma)))
    return max(100, min(value, 1_00_000_00))


def _city(rng: random.Random) -> str:
    return rng.choices(_CITY_NAMES, weights=_CITY_WEIGHTS)[0]


def _far_city(rng: random.Random, home: str, min_km: float) -> str:
    candidates = [c for c in _CITY_NAMES if haversine_km(CITIES[c], CITIES[home]) >= min_km]
    return rng.choice(candidates or list(_CITY_NAMES))


@dataclass
class _Payer:
    vpa: str
    city: str
    device: str
    median: int
    per_day: float
    rooted: bool
    sends_device: bool = True
    sends_location: bool = True
    joins: datetime = START  # half the payers start paying during the period: new payers


class _World:
    def __init__(self, seed: int, payers: int, days: float) -> None:
        self.rng = random.Random(seed)
        self.days = days
        self.end = START + timedelta(days=days)
        self.merchants = [f"shop{i}@{_HANDLES[i % 6]}" for i in range(300)]
        # Zipf-like popularity: a few merchants take most of the payments.
        self.merchant_weights = [1 / (i + 1) ** 1.1 for i in range(300)]
        self.payers = [self._payer(i, days) for i in range(payers)]
        self.out: list[LabelledTxn] = []

    def _payer(self, i: int, days: float) -> _Payer:
        rng = self.rng
        joins = START + timedelta(days=rng.uniform(0, days * 0.9))
        median = int(min(max(math.exp(rng.gauss(math.log(500), 1.1)), 10), 25_000) * 100)
        return _Payer(
            vpa=f"user{i}@{rng.choice(_HANDLES)}",
            city=_city(rng),
            device=f"dev-{i}-0",
            median=median,
            per_day=min(max(math.exp(rng.gauss(math.log(1.2), 0.9)), 0.1), 15.0),
            rooted=rng.random() < 0.01,
            # Some merchant integrations send no device data; some phones share no location.
            sends_device=rng.random() >= 0.15,
            sends_location=rng.random() >= 0.1,
            joins=joins if rng.random() < 0.5 else START,
        )

    def add(self, txn: Txn, typology: str = "legit") -> None:
        self.out.append(LabelledTxn(txn, typology != "legit", typology))

    def merchant(self) -> str:
        return self.rng.choices(self.merchants, weights=self.merchant_weights)[0]

    # ------------------------------------------------------------------ ordinary traffic

    def ordinary(self, p: _Payer) -> None:
        rng = self.rng
        friends = [f"friend{rng.randrange(10**6)}@{rng.choice(_HANDLES)}" for _ in range(4)]
        device = p.device
        city = p.city
        change_at = (
            START + timedelta(days=rng.uniform(0, self.days)) if rng.random() < 0.05 else None
        )
        travel_at = (
            START + timedelta(days=rng.uniform(0, self.days)) if rng.random() < 0.08 else None
        )
        trip = _far_city(rng, p.city, 300) if travel_at else None
        at = p.joins + timedelta(days=rng.uniform(0, 1 / max(p.per_day, 0.2)))

        def txn(payee: str, amount: int) -> Txn:
            return Txn(
                p.vpa,
                payee,
                amount,
                at,
                device if p.sends_device else None,
                _near(rng, city) if p.sends_location else None,
                False,
                p.rooted and p.sends_device,
            )

        while at < self.end:
            if change_at is not None and at >= change_at:
                device, change_at = f"{p.device[:-2]}-1", None
            if travel_at is not None and trip is not None and at >= travel_at:
                flight_h = haversine_km(CITIES[city], CITIES[trip]) / 600 + 1.5
                at = max(at, travel_at + timedelta(hours=flight_h))
                city, travel_at = trip, None
            friend = rng.random() < 0.15
            payee = rng.choice(friends) if friend else self.merchant()
            amount = _amount(rng, p.median)
            if rng.random() < 0.12:  # tea, parking, a bus ticket: UPI is used for ₹5 too
                amount = rng.randint(100, 5_000)
            elif rng.random() < 0.02:
                amount = min(amount * rng.randint(5, 30), 1_00_000_00)  # rent, a phone
            if (friend and rng.random() < 0.5) or rng.random() < 0.05:
                # Friends send round sums; fuel, fees and top-ups are often round too.
                step = rng.choice([100_00, 500_00, 1_000_00])
                amount = max(step, round(amount / step) * step)
            self.add(txn(payee, amount))
            if rng.random() < 0.05:  # split the bill, pay the rest, a retry
                for _ in range(rng.randint(1, 2)):
                    at += timedelta(seconds=rng.uniform(10, 50))
                    small = _amount(rng, p.median // 2 or 100)
                    self.add(
                        Txn(p.vpa, payee, small, at, device, _near(rng, city), False, p.rooted)
                    )
            at += timedelta(days=rng.expovariate(p.per_day))

    # ------------------------------------------------------------------ fraud typologies

    def _when(self) -> datetime:
        return START + timedelta(days=self.rng.uniform(0.3, self.days))

    def _victim(self) -> _Payer:
        return self.rng.choice(self.payers)

    def account_takeover(self, i: int) -> None:
        rng, v, at = self.rng, self._victim(), self._when()
        city = rng.choice([v.city, _city(rng)])
        mule = f"mule{i}@{rng.choice(_HANDLES)}"
        for _ in range(rng.randint(1, 3)):
            amount = max(5_000_00, min(v.median * rng.randint(5, 40), 1_00_000_00))
            self.add(Txn(v.vpa, mule, amount, at, f"atk-{i}", _near(rng, city)), "account_takeover")
            at += timedelta(minutes=rng.uniform(1, 5))

    def sim_swap(self, i: int) -> None:
        rng, v, at = self.rng, self._victim(), self._when()
        device = f"swap-{i}"
        payee = f"cashout{i}@{rng.choice(_HANDLES)}"
        self.add(
            Txn(v.vpa, payee, rng.randint(100, 1_000), at, device, _near(rng, v.city)), "sim_swap"
        )
        at += timedelta(minutes=rng.uniform(10, 120))
        for _ in range(rng.randint(1, 3)):
            amount = max(10_000_00, min(v.median * rng.randint(10, 60), 1_00_000_00))
            self.add(Txn(v.vpa, payee, amount, at, device, _near(rng, v.city)), "sim_swap")
            at += timedelta(minutes=rng.uniform(1, 10))

    def mule_fan_in(self, i: int) -> None:
        rng, at = self.rng, self._when()
        collector = f"collector{i}@{rng.choice(_HANDLES)}"
        phones = [f"mulephone-{i}-{k}" for k in range(rng.randint(2, 3))]
        city = _city(rng)
        for j in range(rng.randint(8, 25)):
            mule = f"m{i}x{j}@{rng.choice(_HANDLES)}"
            for _ in range(rng.randint(1, 2)):
                amount = rng.choice(
                    [9_999_00, 19_999_00, 49_999_00, rng.randint(2_000, 49_999) * 100]
                )
                when = at + timedelta(minutes=rng.uniform(0, 60))
                self.add(
                    Txn(mule, collector, amount, when, rng.choice(phones), _near(rng, city)),
                    "mule_fan_in",
                )

    def velocity_burst(self, i: int) -> None:
        rng, v, at = self.rng, self._victim(), self._when()
        for _ in range(rng.randint(6, 15)):
            payee = self.merchant() if rng.random() < 0.5 else f"drain{i}@{rng.choice(_HANDLES)}"
            amount = rng.randint(500, 5_000) * 100
            self.add(Txn(v.vpa, payee, amount, at, v.device, _near(rng, v.city)), "velocity_burst")
            at += timedelta(seconds=rng.uniform(5, 30))

    def impossible_travel(self, i: int) -> None:
        rng, v, at = self.rng, self._victim(), self._when()
        self.add(
            Txn(v.vpa, self.merchant(), _amount(rng, v.median), at, v.device, _near(rng, v.city))
        )
        far = _far_city(rng, v.city, 800)
        device = v.device if rng.random() < 0.5 else f"clone-{i}"
        at += timedelta(minutes=rng.uniform(5, 60))
        amount = _amount(rng, max(v.median * 3, 2_000_00))
        self.add(
            Txn(v.vpa, f"fence{i}@{rng.choice(_HANDLES)}", amount, at, device, _near(rng, far)),
            "impossible_travel",
        )

    def merchant_collusion(self, i: int) -> None:
        rng, at = self.rng, self._when()
        shop = f"colluder{i}@{rng.choice(_HANDLES)}"
        phones = [f"colludephone-{i}-{k}" for k in range(rng.randint(1, 2))]
        emulator = rng.random() < 0.5
        city = _city(rng)
        for j in range(rng.randint(3, 6)):
            payer = f"c{i}x{j}@{rng.choice(_HANDLES)}"
            for _ in range(rng.randint(4, 10)):
                amount = rng.choice([1_000_00, 2_000_00, 5_000_00, 10_000_00])
                when = at + timedelta(minutes=rng.uniform(0, 60))
                self.add(
                    Txn(payer, shop, amount, when, rng.choice(phones), _near(rng, city), emulator),
                    "merchant_collusion",
                )


# Incidents per typology for 3,000 payers over 4 days: about 4 % of payments are fraud,
# each typology a few hundred of them (a takeover is 1-3 payments, a mule ring dozens).
INCIDENTS = {
    "account_takeover": 100,
    "sim_swap": 60,
    "mule_fan_in": 12,
    "velocity_burst": 30,
    "impossible_travel": 150,
    "merchant_collusion": 10,
}


def simulate(
    seed: int, payers: int = 5_000, days: float = 4.0, scale: float = 1.0
) -> list[LabelledTxn]:
    """Traffic of ``payers`` ordinary payers over ``days`` plus fraud incidents
    (:data:`INCIDENTS` times ``scale``), in time order."""
    world = _World(seed, payers, days)
    for p in world.payers:
        world.ordinary(p)
    i = 0
    for typology, count in INCIDENTS.items():
        for _ in range(max(1, round(count * scale))):
            getattr(world, typology)(i)
            i += 1
    world.out.sort(key=lambda t: t.txn.at)
    return world.out


def featurise(traffic: list[LabelledTxn]) -> Iterator[tuple[LabelledTxn, list[float], object]]:
    """Each payment with its feature vector and history, computed from what came before."""
    tracker = HistoryTracker()
    for item in traffic:
        history = tracker.history(item.txn)
        yield item, feature_vector(item.txn, history), history
        tracker.observe(item.txn)

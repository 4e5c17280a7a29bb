"""A simulator of UPI traffic with fraud typologies: the data the model is trained and
evaluated on (documented in ``docs/fraud.md``). Deterministic for a seed.

Ordinary payers live in an Indian city (:data:`fraud.cities.CITIES`), pay from one phone
(some change phones, a few are rooted), mostly merchants (a few very popular ones take
hundreds of payers an hour) and sometimes friends, with amounts around their own typical
amount; some split bills in quick succession, make a large purchase, or fly to another
city. Ordinary life also looks odd at times without being fraud: festival days (more
payments, bigger ones, pop-up stalls nobody paid before, each paid by many locals within
minutes), families sharing one phone, shop owners paying many suppliers in a morning,
air travel, retail prices just under a round figure (₹9,999), and light customers who pay
twice in the whole period. Fraud comes as incidents of these typologies, written from
public descriptions of UPI fraud (RBI and NPCI advisories, bank and press reports), each
with randomised parameters:

``account_takeover``
    an attacker's device pays a victim's money out, many times the victim's usual amount,
    from anywhere, within minutes;
``sim_swap``
    account takeover after a SIM swap: the victim's number moves to a new device, a tiny
    probe payment follows, then within two hours large payments from the victim's city;
``mule_fan_in``
    many first-time payers (mule VPAs, some recruited account holders), on their own phones
    in different cities or on a few shared ones, pay one fresh collecting VPA within
    minutes, mostly just under a round limit;
``mule_fan_in_slow``
    the same spread over hours, a few payers an hour, to stay under fan-in rules;
``device_farm``
    one to three phones (sometimes emulators) cycle through many mule VPAs, each paying a
    collector or buying vouchers, one after another;
``probing``
    stolen credentials on the attacker's device: a few ₹1-₹10 payments to check that the
    account works, then a large one;
``collect_request_scam``
    social engineering: a fresh scammer VPA sends collect requests ("approve to receive
    your refund") to many victims, who approve from their own phones, sometimes again when
    told it "failed";
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

import numpy as np

from fraud.cities import CITIES
from fraud.features import Txn, feature_vector, haversine_km
from fraud.history import HistoryTracker

__all__ = ["TYPOLOGIES", "LabelledTxn", "featurise", "simulate"]

TYPOLOGIES = (
    "account_takeover",
    "sim_swap",
    "mule_fan_in",
    "mule_fan_in_slow",
    "device_farm",
    "probing",
    "collect_request_scam",
    "velocity_burst",
    "impossible_travel",
    "merchant_collusion",
)
# Limits people structure payments under (fraud.features.ROUND_LIMITS_PAISE), the small
# ones more often.
_LIMITS = (10_000_00, 50_000_00, 20_000_00, 25_000_00, 1_00_000_00)
_LIMIT_WEIGHTS = (5, 3, 2, 1, 1)
START = datetime(2026, 1, 5, tzinfo=UTC)
_US = timedelta(microseconds=1)
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


def _under_limit(rng: random.Random) -> int:
    """An amount just under a round limit: ₹9,999, ₹49,990, ₹19,950 ..."""
    limit = rng.choices(_LIMITS, weights=_LIMIT_WEIGHTS)[0]
    return limit - rng.choice([100, 100, 1_000, 5_000, rng.randint(1, 250) * 100])


def _price_point(rng: random.Random) -> int:
    """A retail price: ₹499, ₹1,999, ₹9,999, ₹49,990 (shops price just under a figure)."""
    return rng.choice([499, 999, 1_499, 1_999, 2_999, 4_999, 9_999, 14_999, 49_990]) * 100


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
    kind: str = "everyday"  # or "light" (two payments), "shop_owner"


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
        self._joined_us: np.ndarray | None = None  # each payer's joining time, for _victim
        # A festival day (Diwali, Eid, Onam ...): more payments, bigger ones, and pop-up
        # stalls that nobody paid before, each paid by many locals within minutes.
        self.festival = START + timedelta(days=self.rng.uniform(0.5, max(days - 1.0, 0.6)))
        self.stalls = {
            city: [f"stall{k}.{city.lower().replace(' ', '')}@{_HANDLES[k % 6]}" for k in range(2)]
            for city in _CITY_NAMES
        }
        # Shops that open during the period (young payees paid by locals, old and new).
        self.new_shops = {
            city: (f"newshop.{city.lower().replace(' ', '')}@ybl", self._opening())
            for city in _CITY_NAMES
        }
        self.families: list[list[_Payer]] = []
        self._households()

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
            kind=rng.choices(["everyday", "light", "shop_owner"], weights=[78, 20, 2])[0],
        )

    def _opening(self) -> datetime:
        return START + timedelta(days=self.rng.uniform(0, self.days))

    def opened_before(self) -> None:
        """The shops were paid long before the simulated period: one payment each, 7-90
        days earlier, so a shop is not a young payee on the first day."""
        for k, shop in enumerate(self.merchants):
            at = START - timedelta(days=self.rng.uniform(7, 90))
            self.add(Txn(f"opening{k}@ybl", shop, 10_000, at))

    def _households(self) -> None:
        """A family sharing one phone: 2-4 payers of one city on the first one's device."""
        rng = self.rng
        everyday = [p for p in self.payers if p.kind == "everyday" and p.sends_device]
        rng.shuffle(everyday)
        for _ in range(len(self.payers) // 40):
            size = rng.randint(2, 4)
            family, everyday = everyday[:size], everyday[size:]  # one household each
            for member in family[1:]:
                member.device = family[0].device
                member.city = family[0].city
            if len(family) > 1:
                self.families.append(family)

    def add(self, txn: Txn, typology: str = "legit") -> None:
        self.out.append(LabelledTxn(txn, typology != "legit", typology))

    def merchant(self) -> str:
        return self.rng.choices(self.merchants, weights=self.merchant_weights)[0]

    # ------------------------------------------------------------------ ordinary traffic

    def ordinary(self, p: _Payer) -> None:
        if p.kind == "light":
            self.light(p)
            return
        if p.kind == "shop_owner":
            self.shop_owner(p)
        self.everyday(p)

    def family_together(self, family: list[_Payer]) -> None:
        """Two of a family on their one phone paying one after the other, seconds or
        minutes apart (each their own order at a shop, a bill each, a place nobody paid
        before): a few times in the period. (Three or more on one phone within ten
        minutes is what a device farm looks like: ``DEVICE_SHARED`` steps it up.)"""
        rng = self.rng
        joined = max(p.joins for p in family)
        for _ in range(rng.randint(1, 3)):
            at = joined + timedelta(days=rng.uniform(0, self.days))
            payee = self.merchant() if rng.random() < 0.6 else f"place{rng.randrange(10**6)}@ybl"
            for p in rng.sample(family, k=2):
                if at < self.end:
                    amount = _amount(rng, p.median)
                    self.add(Txn(p.vpa, payee, amount, at, p.device, _near(rng, p.city)))
                at += timedelta(seconds=rng.uniform(3, 300))

    def onboarding(self, k: int) -> None:
        """A merchant moves its collections to this engine (or launches): a payee nobody
        paid here before, paid within an hour or three by hundreds of customers, many or
        all of them new to the engine too (a merchant launching on a new PSP brings its own
        customers), everyday amounts of its trade on their own phones, across the country
        (an online shop) or one city (a chain), at times dozens a minute (a launch sale)."""
        rng = self.rng
        shop = f"brand{k}.{rng.randrange(10**4)}@{rng.choice(_HANDLES)}"
        at = START + timedelta(days=rng.uniform(0.2, self.days - 0.2))
        end = at + timedelta(hours=rng.uniform(1, 3))
        per_min = rng.uniform(1, 8) if rng.random() < 0.7 else rng.uniform(8, 20)
        typical = int(math.exp(rng.gauss(math.log(600), 0.9)) * 100)
        city = _city(rng) if rng.random() < 0.4 else None
        known = rng.uniform(0, 0.5)  # the share of its customers the engine knows already
        n = 0
        while at < end:
            if rng.random() < known:
                p = self._victim(at)  # a customer the engine already knows
                vpa, device, home = p.vpa, p.device, p.city
            else:
                vpa = f"cust{k}x{n}@{rng.choice(_HANDLES)}"
                device, home = f"cust-{k}-{n}", city or _city(rng)
            amount = _amount(rng, typical)
            if rng.random() < 0.05:
                amount = _price_point(rng)
            self.add(Txn(vpa, shop, amount, at, device, _near(rng, home)))
            if rng.random() < 0.05:  # a second item, or a retry of one that seemed to fail
                again = at + timedelta(seconds=rng.uniform(2, 60))
                self.add(Txn(vpa, shop, _amount(rng, typical), again, device, _near(rng, home)))
            n += 1
            at += timedelta(minutes=rng.expovariate(per_min))

    def light(self, p: _Payer) -> None:
        """Pays twice in the period, from their own phone and city, ₹10 to ₹4,000: a tea,
        a recharge, a bill; sometimes the two within minutes, or to one payee within
        seconds (a retry of a payment that seemed to fail, a second item)."""
        rng = self.rng
        at = p.joins + timedelta(days=rng.uniform(0, 1))
        for _ in range(2):
            amount = int(math.exp(rng.uniform(math.log(10_00), math.log(4_000_00))))
            payee = self.merchant() if rng.random() < 0.8 else f"friend{rng.randrange(10**6)}@ybl"
            device = p.device if p.sends_device else None
            self.add(Txn(p.vpa, payee, amount, at, device, _near(rng, p.city), False, False))
            if rng.random() < 0.25:  # a retry of a payment that seemed to fail, a second item
                at += timedelta(seconds=rng.uniform(2, 60))
                amount = int(math.exp(rng.uniform(math.log(10_00), math.log(4_000_00))))
                self.add(Txn(p.vpa, payee, amount, at, device, _near(rng, p.city)))
                return
            gap = rng.choice([rng.uniform(30, 600), rng.uniform(3_600, 3 * 86_400)])
            at += timedelta(seconds=gap)

    def shop_owner(self, p: _Payer) -> None:
        """A shop owner's mornings: 4-15 suppliers paid within two hours, some for the
        first time, wholesale amounts, some round."""
        rng = self.rng
        suppliers = [f"supplier{rng.randrange(10**7)}@{rng.choice(_HANDLES)}" for _ in range(12)]
        day = START + timedelta(days=rng.uniform(0, self.days * 0.8))
        at = day
        for _ in range(rng.randint(4, 15)):
            supplier = rng.choice(suppliers)
            amount = _amount(rng, max(p.median * 4, 3_000_00), 0.8)
            if rng.random() < 0.4:
                amount = max(1_000_00, round(amount / 1_000_00) * 1_000_00)
            self.add(Txn(p.vpa, supplier, amount, at, p.device, _near(rng, p.city)))
            at += timedelta(minutes=rng.uniform(1, 20))

    def festival_day(self, p: _Payer, at: datetime, device: str | None, city: str) -> datetime:
        """Festival shopping: 2-8 payments within hours, some at the city's pop-up stalls
        (young payees, many payers each), gifts, sweets, clothes; returns when it ended."""
        rng = self.rng
        for _ in range(rng.randint(2, 8)):
            if rng.random() < 0.4:
                payee, amount = rng.choice(self.stalls[city]), rng.randint(20, 1_500) * 100
            elif rng.random() < 0.3:
                payee = f"family{rng.randrange(10**6)}@{rng.choice(_HANDLES)}"
                amount = rng.choice([501, 1_001, 2_100, 5_100, 11_000]) * 100  # shagun
            else:
                payee, amount = self.merchant(), _amount(rng, p.median * rng.randint(2, 8))
            self.add(Txn(p.vpa, payee, amount, at, device, _near(rng, city), False, p.rooted))
            at += timedelta(minutes=rng.expovariate(1 / 25))
        return at

    def everyday(self, p: _Payer) -> None:
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
        festive = rng.random() < 0.3

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
                self.add(txn(self.merchant(), _amount(rng, p.median)))  # at the airport
                at = max(at, travel_at) + timedelta(hours=flight_h)
                city, travel_at = trip, None
                cab = f"cab{rng.randrange(10**5)}.{trip.lower().replace(' ', '')}@ybl"
                self.add(txn(cab, rng.randint(200, 2_500) * 100))  # a taxi from the airport
                at += timedelta(minutes=rng.uniform(30, 180))
            if festive and self.festival <= at < self.festival + timedelta(days=1):
                start = self.festival + timedelta(hours=rng.uniform(10, 14))  # the evening
                if at < start:
                    at = self.festival_day(
                        p, start, device if p.sends_device else None, city
                    ) + timedelta(days=rng.expovariate(p.per_day))
                festive = False
                continue
            friend = rng.random() < 0.15
            payee = rng.choice(friends) if friend else self.merchant()
            shop, opened = self.new_shops[city]
            if not friend and opened <= at and rng.random() < 0.05:
                payee = shop  # the new shop round the corner
            amount = _amount(rng, p.median)
            if not friend and rng.random() < 0.03:
                amount = _price_point(rng)  # ₹9,999 at a shop is a price, not structuring
            elif rng.random() < 0.12:  # tea, parking, a bus ticket: UPI is used for ₹5 too
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

    def _victim(self, at: datetime | None = None) -> _Payer:
        """A payer; with ``at``, one who had been paying for six hours by then (an account
        takeover robs a customer the engine knows; a stranger's first payment is another
        problem)."""
        if at is None:
            return self.rng.choice(self.payers)
        # The payers (in their order) who joined by then, found without a pass over them
        # all in Python: the same draw as ``rng.choice([p for p in payers if ...])``.
        if self._joined_us is None:
            self._joined_us = np.array([(p.joins - START) // _US for p in self.payers])
        known = np.flatnonzero(self._joined_us <= (at - timedelta(hours=6) - START) // _US)
        if not len(known):
            return self.rng.choice(self.payers)
        return self.payers[int(self.rng.choice(known))]

    def account_takeover(self, i: int) -> None:
        rng, at = self.rng, self._when()
        v = self._victim(at)
        city = rng.choice([v.city, _city(rng)])
        mule = f"mule{i}@{rng.choice(_HANDLES)}"
        for _ in range(rng.randint(1, 3)):
            amount = max(5_000_00, min(v.median * rng.randint(5, 40), 1_00_000_00))
            self.add(Txn(v.vpa, mule, amount, at, f"atk-{i}", _near(rng, city)), "account_takeover")
            at += timedelta(minutes=rng.uniform(1, 5))

    def sim_swap(self, i: int) -> None:
        rng, at = self.rng, self._when()
        v = self._victim(at)
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

    def _mule_payers(self, i: int, n: int, shared: bool, cities: list[str]) -> list[_Payer]:
        """Mules: mostly fresh VPAs on their own phones (or a few shared ones); some are
        recruited account holders paying from their usual phone and city."""
        rng = self.rng
        phones = [f"mulephone-{i}-{k}" for k in range(rng.randint(2, 3))]
        mules = []
        for j in range(n):
            if rng.random() < 0.15:
                mules.append(self._victim())  # a recruited (or rented) account
                continue
            mules.append(
                _Payer(
                    vpa=f"m{i}x{j}@{rng.choice(_HANDLES)}",
                    city=rng.choice(cities),
                    device=rng.choice(phones) if shared else f"mule-{i}-{j}",
                    median=0,
                    per_day=0,
                    rooted=False,
                )
            )
        return mules

    def _mule_payment(self, mule: _Payer, collector: str, at: datetime) -> Txn:
        """A mule's payment to the collector from its phone and city: mostly just under a
        round limit, sometimes any sizeable sum."""
        rng = self.rng
        amount = _under_limit(rng) if rng.random() < 0.85 else rng.randint(2_000, 49_999) * 100
        return Txn(mule.vpa, collector, amount, at, mule.device, _near(rng, mule.city))

    def mule_fan_in(self, i: int) -> None:
        rng, at = self.rng, self._when()
        collector = f"collector{i}@{rng.choice(_HANDLES)}"
        spread = rng.random() < 0.7  # own phones in different cities, or one city
        cities = [_city(rng) for _ in range(8)] if spread else [_city(rng)]
        span_min = rng.uniform(2, 20)
        for mule in self._mule_payers(i, rng.randint(6, 30), not spread, cities):
            when = at + timedelta(minutes=rng.uniform(0, span_min))
            for _ in range(1 if rng.random() < 0.8 else 2):
                self.add(self._mule_payment(mule, collector, when), "mule_fan_in")
                when += timedelta(seconds=rng.uniform(20, 120))

    def mule_fan_in_slow(self, i: int) -> None:
        rng, at = self.rng, self._when()
        collector = f"pool{i}@{rng.choice(_HANDLES)}"
        cities = [_city(rng) for _ in range(6)]
        hours = rng.uniform(2, 8)
        for mule in self._mule_payers(i, rng.randint(8, 30), False, cities):
            when = at + timedelta(hours=rng.uniform(0, hours))
            self.add(self._mule_payment(mule, collector, when), "mule_fan_in_slow")

    def device_farm(self, i: int) -> None:
        rng, at = self.rng, self._when()
        city = _city(rng)
        emulator = rng.random() < 0.3
        collectors = [f"farmcash{i}x{k}@{rng.choice(_HANDLES)}" for k in range(rng.randint(1, 3))]
        for k in range(rng.randint(1, 3)):
            phone = f"farm-{i}-{k}"
            when = at + timedelta(minutes=rng.uniform(0, 30))
            for j in range(rng.randint(6, 25)):
                vpa = f"f{i}x{k}x{j}@{rng.choice(_HANDLES)}"
                for _ in range(rng.randint(1, 2)):
                    payee = rng.choice(collectors) if rng.random() < 0.7 else self.merchant()
                    amount = (
                        _under_limit(rng) if rng.random() < 0.4 else rng.randint(500, 20_000) * 100
                    )
                    self.add(
                        Txn(vpa, payee, amount, when, phone, _near(rng, city, 0.02), emulator),
                        "device_farm",
                    )
                    when += timedelta(seconds=rng.uniform(15, 90))
                when += timedelta(seconds=rng.uniform(20, 180))

    def probing(self, i: int) -> None:
        rng, at = self.rng, self._when()
        v = self._victim(at)
        device = f"probe-{i}"
        city = v.city if rng.random() < 0.5 else _city(rng)
        target = f"payout{i}@{rng.choice(_HANDLES)}"
        for _ in range(rng.randint(2, 5)):
            payee = target if rng.random() < 0.6 else self.merchant()
            self.add(
                Txn(v.vpa, payee, rng.randint(100, 1_000), at, device, _near(rng, city)), "probing"
            )
            at += timedelta(seconds=rng.uniform(20, 300))
        for _ in range(rng.randint(1, 2)):
            amount = max(5_000_00, min(v.median * rng.randint(5, 40), 1_00_000_00))
            self.add(Txn(v.vpa, target, amount, at, device, _near(rng, city)), "probing")
            at += timedelta(minutes=rng.uniform(1, 5))

    def collect_request_scam(self, i: int) -> None:
        rng, at = self.rng, self._when()
        scammer = f"refund.desk{i}@{rng.choice(_HANDLES)}"
        hours = rng.uniform(0.5, 3)
        for _ in range(rng.randint(5, 20)):
            when = at + timedelta(hours=rng.uniform(0, hours))
            v = self._victim(when)
            amount = max(1_000_00, min(v.median * rng.randint(3, 20), 50_000_00))
            for _ in range(rng.randint(1, 3)):  # "it failed, approve again"
                self.add(
                    Txn(v.vpa, scammer, amount, when, v.device, _near(rng, v.city)),
                    "collect_request_scam",
                )
                when += timedelta(minutes=rng.uniform(1, 6))
                amount = min(amount * 2, 1_00_000_00)

    def velocity_burst(self, i: int) -> None:
        rng, at = self.rng, self._when()
        v = self._victim(at)
        for _ in range(rng.randint(6, 15)):
            # Drained to mule accounts mostly, some spent on vouchers at a shop.
            payee = self.merchant() if rng.random() < 0.2 else f"drain{i}@{rng.choice(_HANDLES)}"
            amount = rng.randint(500, 5_000) * 100
            self.add(Txn(v.vpa, payee, amount, at, v.device, _near(rng, v.city)), "velocity_burst")
            at += timedelta(seconds=rng.uniform(5, 30))

    def impossible_travel(self, i: int) -> None:
        rng, at = self.rng, self._when()
        v = self._victim(at)
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


# Incidents per typology for 5,000 payers over 4 days: about 6 % of payments are fraud,
# each typology a few hundred of them (a takeover is 1-3 payments, a mule ring dozens).
INCIDENTS = {
    "account_takeover": 100,
    "sim_swap": 60,
    "mule_fan_in": 14,
    "mule_fan_in_slow": 14,
    "device_farm": 12,
    "probing": 60,
    "collect_request_scam": 20,
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
    world.opened_before()
    for p in world.payers:
        world.ordinary(p)
    for family in world.families:
        world.family_together(family)
    for k in range(max(1, round(8 * payers / 5_000))):
        world.onboarding(k)
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

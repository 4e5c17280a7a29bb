"""The history of payers, devices and payees, kept in memory: what the simulator uses to
compute features for training. :mod:`fraud.store` keeps the same history in PostgreSQL for
live scoring; a test holds the two to the same numbers on the same traffic.

Rules both follow (the *definition* of each :class:`~fraud.features.History` field):

* windows hold the payments observed before this one whose time is later than
  ``txn.at - window`` (1 min, 1 h, 24 h);
* ``payer_median_amount`` is the lower median of the payer's last 50 amounts;
* ``usual_places`` are the (at most 5) most frequent 0.1° cells of the payer's last 50
  located payments, as cell centres, ties broken by the cell;
* ``last_location`` / ``seconds_since_last`` come from the payer's latest located payment;
* ``device_vpas_24h`` counts the *other* payers seen on the device in 24 h;
* the payee's 1 h window holds at most its latest ``PAYEE_WINDOW`` (1,000) payments: a
  merchant paid thousands of times an hour would otherwise make the check of every
  payment to it read all of them, and the fan-in rule (30 distinct payers) is decided
  long before that;
* the payee's 10 min window is the part of its (capped) 1 h window later than
  ``txn.at - 10 min``; a payer is *new* in a payee window when that payment was the
  payer's first recorded payment (``payer_payments_ever`` was 0); ``payee_new_payers_*``
  count the distinct payers of the window who paid so;
* ``payee_first_seen_s`` is the time since the earliest payment to the payee observed
  before this one (within the retention: the pruned are forgotten), None if none;
* ``device_payers_10m`` counts the *other* payers seen on the device in 10 min;
  ``payer_devices_24h`` the distinct devices of the payer's payments in 24 h;
* ``seconds_since_device_change`` is how long the payer's current device has been in use,
  when the payer had another device before it (0 for a device new to the payer), or None;
* ``seconds_since_prev`` is the time since the latest of the payer's payments in its 24 h
  window, None if none; ``payer_to_payee_10m`` counts those of the last 10 minutes to
  this payee;
* ``payer_milli_log_sum`` is the sum of :func:`~fraud.features.milli_log` of every amount
  the payer paid (kept, like the count, when the payments are pruned): with the count, the
  payer's usual amount; a payment is *large* when
  :func:`~fraud.features.large_vs_usual` said so of it against the payer as it was before
  it; for a payee first paid less than a day before this payment, ``young_payee_payers``
  counts the distinct payers of its latest ``PAYEE_WINDOW`` payments (all of its day) and
  ``young_payee_large_payers`` those who paid so; both are 0 for an older payee;
* ``payee_structured_payers_10m`` / ``_1h`` count the distinct payers of the payee's 10 min
  and 1 h windows who paid a structured amount (:func:`~fraud.features.structuring_gap`),
  for a payee first paid less than a day before (what the rules and the model read); 0
  for an older payee, whose every payment would otherwise cost two more passes over its
  window.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from fraud.features import History, Txn, large_vs_usual, milli_log, structuring_gap

__all__ = ["HistoryTracker", "cell_centre"]

MINUTE = timedelta(minutes=1)
TEN_MINUTES = timedelta(minutes=10)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
RECENT = 50
USUAL_PLACES = 5
PAYEE_WINDOW = 1_000


def cell_centre(location: tuple[float, float]) -> tuple[float, float]:
    lat, lon = location
    return (math.floor(lat * 10) / 10 + 0.05, math.floor(lon * 10) / 10 + 0.05)


@dataclass(frozen=True)
class _Seen:
    at: datetime
    amount: int
    location: tuple[float, float] | None
    other: str  # the payer (for device and payee windows)
    device: str | None = None
    payer_new: bool = False  # the payer's first recorded payment
    payee: str = ""
    payer_large: bool = False  # well above its payer's usual (features.large_vs_usual)

    @property
    def structured(self) -> bool:
        return structuring_gap(self.amount) is not None


def _window(items: deque[_Seen], since: datetime) -> list[_Seen]:
    """The items after ``since``, oldest first. Items are kept in time order (``observe``
    appends, ``_prune`` drops from the left), so the scan stops at the first older one:
    the cost is the window's, not the day's."""
    newer: list[_Seen] = []
    for seen in reversed(items):
        if seen.at <= since:
            break
        newer.append(seen)
    newer.reverse()
    return newer


def _in_order(items: deque[_Seen], seen: _Seen) -> None:
    """Append, or insert where it belongs if it happened before the latest (time order
    is what ``_window`` and ``_prune`` rely on)."""
    if items and items[-1].at > seen.at:
        items.insert(bisect.bisect_right(items, seen.at, key=lambda s: s.at), seen)
    else:
        items.append(seen)


def usual_places(locations: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    counts = Counter(cell_centre(loc) for loc in locations)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(cell for cell, _ in ranked[:USUAL_PLACES])


class HistoryTracker:
    def __init__(self) -> None:
        self._payer: dict[str, deque[_Seen]] = defaultdict(deque)  # last 24 h
        self._payer_recent: dict[str, deque[_Seen]] = defaultdict(lambda: deque(maxlen=RECENT))
        self._payer_count: Counter[str] = Counter()
        self._payer_last_located: dict[str, _Seen] = {}
        self._device: dict[str, deque[_Seen]] = defaultdict(deque)
        self._payee: dict[str, deque[_Seen]] = defaultdict(deque)
        self._devices_of: dict[str, dict[str, datetime]] = defaultdict(dict)
        self._payee_first: dict[str, datetime] = {}
        self._payer_milli_logs: Counter[str] = Counter()

    @staticmethod
    def _prune(items: deque[_Seen], now: datetime) -> None:
        while items and items[0].at <= now - DAY:
            items.popleft()

    def history(self, txn: Txn) -> History:
        at = txn.at
        payer = self._payer[txn.payer]
        self._prune(payer, at)
        p1m = _window(payer, at - MINUTE)
        p1h = _window(payer, at - HOUR)
        p24 = _window(payer, at - DAY)
        recent = self._payer_recent[txn.payer]
        located = [s.location for s in recent if s.location is not None]
        last = self._payer_last_located.get(txn.payer)
        device_count_1h = 0
        device_vpas = 0
        device_payers_10m = 0
        known = False
        since_change: float | None = None
        devices = self._devices_of[txn.payer]
        if txn.device_id is not None:
            seen = self._device[txn.device_id]
            self._prune(seen, at)
            device_count_1h = len(_window(seen, at - HOUR))
            device_vpas = len({s.other for s in _window(seen, at - DAY)} - {txn.payer})
            device_payers_10m = len(
                {s.other for s in _window(seen, at - TEN_MINUTES)} - {txn.payer}
            )
            known = txn.device_id in devices
            if devices:
                current = devices.get(txn.device_id, at)
                if any(first < current for d, first in devices.items() if d != txn.device_id):
                    since_change = (at - current).total_seconds()
        payee = self._payee[txn.payee]
        self._prune(payee, at)
        payee_1h = _window(payee, at - HOUR)[-PAYEE_WINDOW:]
        payee_10m = [s for s in payee_1h if s.at > at - TEN_MINUTES]
        payee_first = self._payee_first.get(txn.payee)
        young = payee_first is not None and at - payee_first < DAY
        payee_day = _window(payee, at - DAY)[-PAYEE_WINDOW:] if young else []
        return History(
            payer_count_1m=len(p1m),
            payer_count_1h=len(p1h),
            payer_count_24h=len(p24),
            payer_amount_1h=sum(s.amount for s in p1h),
            payer_amount_24h=sum(s.amount for s in p24),
            payer_payments_ever=self._payer_count[txn.payer],
            payer_median_amount=statistics.median_low([s.amount for s in recent]) if recent else 0,
            device_count_1h=device_count_1h,
            device_vpas_24h=device_vpas,
            payee_count_1h=len(payee_1h),
            payee_payers_1h=len({s.other for s in payee_1h}),
            device_known_for_payer=known,
            payer_devices_ever=len(devices),
            seconds_since_device_change=since_change,
            last_location=last.location if last else None,
            seconds_since_last=(at - last.at).total_seconds() if last else None,
            usual_places=usual_places(located),
            payee_first_seen_s=(at - payee_first).total_seconds() if payee_first else None,
            payee_payers_10m=len({s.other for s in payee_10m}),
            payee_new_payers_10m=len({s.other for s in payee_10m if s.payer_new}),
            payee_new_payers_1h=len({s.other for s in payee_1h if s.payer_new}),
            device_payers_10m=device_payers_10m,
            payer_devices_24h=len({s.device for s in p24 if s.device is not None}),
            seconds_since_prev=(at - p24[-1].at).total_seconds() if p24 else None,
            payer_to_payee_10m=sum(
                1 for s in p24 if s.payee == txn.payee and s.at > at - TEN_MINUTES
            ),
            young_payee_payers=len({s.other for s in payee_day}),
            young_payee_large_payers=len({s.other for s in payee_day if s.payer_large}),
            payee_structured_payers_10m=len({s.other for s in payee_10m if s.structured})
            if young
            else 0,
            payee_structured_payers_1h=len({s.other for s in payee_1h if s.structured})
            if young
            else 0,
            payer_milli_log_sum=self._payer_milli_logs[txn.payer],
        )

    def observe(self, txn: Txn) -> None:
        seen = _Seen(
            txn.at,
            txn.amount_paise,
            txn.location,
            txn.payer,
            txn.device_id,
            self._payer_count[txn.payer] == 0,
            txn.payee,
            large_vs_usual(
                txn.amount_paise, self._payer_count[txn.payer], self._payer_milli_logs[txn.payer]
            ),
        )
        self._payer_milli_logs[txn.payer] += milli_log(txn.amount_paise)
        first = self._payee_first.get(txn.payee)
        if first is None or txn.at < first:
            self._payee_first[txn.payee] = txn.at
        _in_order(self._payer[txn.payer], seen)
        self._payer_recent[txn.payer].append(seen)
        self._payer_count[txn.payer] += 1
        if txn.location is not None:
            self._payer_last_located[txn.payer] = seen
        if txn.device_id is not None:
            _in_order(self._device[txn.device_id], seen)
            self._devices_of[txn.payer].setdefault(txn.device_id, txn.at)
        _in_order(self._payee[txn.payee], seen)

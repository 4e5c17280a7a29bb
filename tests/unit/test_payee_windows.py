"""A batch's payee windows (fraud.store._payee_windows_of) against the definition, window
by window: the payee's payments after the cut-off, the batch's earlier ones included,
newest first as the database orders them, capped; whatever the stored rows, the batch
(older or newer than them) and the cap."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from fraud.features import structuring_gap
from fraud.history import DAY, HOUR, PAYEE_WINDOW, TEN_MINUTES
from fraud.store import PayeeWindow, _payee_windows_of

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
AMOUNTS = (50_000, 9_999_00, 10_000_00, 49_990_00, 1_234_00)  # some just under a round limit


def merged(stored, ats, payers, new, first, large, amounts):
    """Each window built from scratch: candidates sorted newest first, cut, capped; its
    last 10 minutes; the payers new to the engine in both; the payee's earliest payment;
    for a payee first paid less than a day before, those who paid a structured amount in
    both, its payers in the day (capped) and those who paid well above their usual."""
    earlier, out = [], []
    for position, (at, payer, is_new, is_large, amount) in enumerate(
        zip(ats, payers, new, large, amounts, strict=True), start=1
    ):
        candidates = sorted((*stored, *earlier), reverse=True)
        window = [row for row in candidates if row[0] > at - HOUR][:PAYEE_WINDOW]
        recent = [row for row in window if row[0] > at - TEN_MINUTES]
        earliest = min([*([first] if first else []), *(row[0] for row in earlier)], default=None)
        young = earliest is not None and at - earliest < DAY
        day = [row for row in candidates if row[0] > at - DAY][:PAYEE_WINDOW] if young else []
        out.append(
            PayeeWindow(
                len(window),
                len({row[3] for row in window}),
                len({row[3] for row in recent}),
                len({row[3] for row in recent if row[4]}),
                len({row[3] for row in window if row[4]}),
                earliest,
                len({row[3] for row in recent if structuring_gap(row[6]) is not None})
                if young
                else 0,
                len({row[3] for row in window if structuring_gap(row[6]) is not None})
                if young
                else 0,
                len({row[3] for row in day}),
                len({row[3] for row in day if row[5]}),
            )
        )
        earlier.append((at, 1, position, payer, is_new, is_large, amount))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fast_windows_equal_the_full_merge(seed):
    rng = random.Random(seed)
    other = random.Random(-seed)  # the "large" flags, apart: the shapes stay the seed's
    payer_pool = [f"p{i}".encode() for i in range(rng.choice([3, 50, 2_000]))]
    n_stored = rng.choice([0, 10, 999, 1_000, 1_500])
    span = rng.choice([timedelta(seconds=30), timedelta(minutes=70)])
    times = sorted((NOW - span * rng.random() for _ in range(n_stored)), reverse=True)
    stored = [
        (
            at,
            0,
            10_000 - i,
            rng.choice(payer_pool),
            rng.random() < 0.3,
            other.random() < 0.2,
            other.choice(AMOUNTS),
        )
        for i, at in enumerate(times)
    ]
    first = min(times) - timedelta(hours=rng.choice([0, 5])) if times else None
    if other.random() < 0.25 and times:  # a payee paid for long: no young-payee counts
        first = min(times) - timedelta(days=3)
    batch = rng.choice([1, 5, 120, 400])
    if rng.random() < 0.2:  # a cut-off exactly on a stored time, to the microsecond
        base = (stored[len(stored) // 2][0] + HOUR) if stored else NOW
    else:
        base = NOW + timedelta(seconds=1)
    ats = [base + timedelta(microseconds=rng.randrange(0, 3_000_000)) for _ in range(batch)]
    if rng.random() < 0.3 and stored:  # payments older than the newest stored ones
        for i in rng.sample(range(batch), k=max(1, batch // 3)):
            ats[i] = stored[0][0] - timedelta(seconds=rng.random() * 20)
    payers = [rng.choice(payer_pool) for _ in range(batch)]
    new = [rng.random() < 0.5 for _ in range(batch)]
    large = [other.random() < 0.3 for _ in range(batch)]
    amounts = [other.choice(AMOUNTS) for _ in range(batch)]
    found = _payee_windows_of(stored, ats, payers, new, first, large, amounts)
    assert found == merged(stored, ats, payers, new, first, large, amounts)
    assert any(w.payers_10m for w in found) == any(w.count_1h for w in found)


def test_the_window_is_capped_and_counts_distinct_payers():
    stored = [
        (NOW - timedelta(seconds=i + 1), 0, i, b"old", False, False, 100)
        for i in range(PAYEE_WINDOW)
    ]
    ats = [NOW + timedelta(microseconds=i) for i in range(3)]
    windows = _payee_windows_of(stored, ats, [b"a", b"b", b"a"])
    assert [w.count_1h for w in windows] == [PAYEE_WINDOW] * 3
    assert [w.payers_1h for w in windows] == [1, 2, 3]  # "old", then a, then b
    assert [w.payers_10m for w in windows] == [1, 2, 3]  # all within the last 17 minutes


def test_new_payers_in_ten_minutes_and_the_payees_first_payment():
    """Of a payee's payers in 10 minutes, those whose payment was their first anywhere
    (the batch's own included); the earliest payment to it, stored or in the batch."""
    stored = [
        (NOW - timedelta(minutes=30), 0, 1, b"regular", False, False, 100),
        (NOW - timedelta(minutes=5), 0, 2, b"fresh1", True, False, 100),
        (NOW - timedelta(minutes=4), 0, 3, b"regular", False, False, 100),
    ]
    ats = [NOW + timedelta(seconds=i) for i in range(3)]
    windows = _payee_windows_of(
        stored, ats, [b"fresh2", b"fresh3", b"x"], [True, True, False], NOW - timedelta(days=2)
    )
    assert [(w.payers_10m, w.new_payers_10m, w.new_payers_1h) for w in windows] == [
        (2, 1, 1),
        (3, 2, 2),
        (4, 3, 3),
    ]
    assert {w.first_at for w in windows} == {NOW - timedelta(days=2)}
    never = _payee_windows_of([], ats, [b"a", b"b", b"c"], [True] * 3, None)
    assert [w.first_at for w in never] == [None, ats[0], ats[0]]


def test_a_young_payees_payers_well_above_their_usual_over_its_day():
    """A payee first paid less than a day ago: its payers so far, and those whose payment
    was far above their usual (a collect-request scam's victims), stored or earlier in the
    batch, each counted once, over its day; nothing for a payee older than a day."""
    stored = [
        (NOW - timedelta(minutes=150), 0, 1, b"victim0", False, True, 100),
        (NOW - timedelta(minutes=40), 0, 2, b"victim1", False, True, 100),
        (NOW - timedelta(minutes=20), 0, 3, b"regular", False, False, 100),
        (NOW - timedelta(minutes=10), 0, 4, b"victim1", False, True, 100),
    ]
    ats = [NOW + timedelta(seconds=i) for i in range(3)]
    payers = [b"victim2", b"victim3", b"x"]
    young = NOW - timedelta(minutes=150)
    windows = _payee_windows_of(stored, ats, payers, [False] * 3, young, [True, True, False])
    assert [(w.young_payers, w.young_large_payers) for w in windows] == [(3, 2), (4, 3), (5, 4)]
    old = _payee_windows_of(stored, ats, payers, [False] * 3, NOW - timedelta(days=2))
    assert {(w.young_payers, w.young_large_payers) for w in old} == {(0, 0)}


def test_payers_of_structured_amounts_in_ten_minutes_and_the_hour():
    """A mule collector's payers pay sums just under a round limit; a shop's price point
    is one amount among many. Counted by payer, stored or earlier in the batch, for a
    young payee (first paid less than a day before); for an older one, 0."""
    stored = [
        (NOW - timedelta(minutes=30), 0, 1, b"m1", True, False, 9_999_00),
        (NOW - timedelta(minutes=5), 0, 2, b"m2", True, False, 49_990_00),
        (NOW - timedelta(minutes=4), 0, 3, b"shopper", False, False, 10_000_00),
    ]
    ats = [NOW + timedelta(seconds=i) for i in range(2)]
    amounts = [19_950_00, 4_999_00]
    young = NOW - timedelta(minutes=30)
    windows = _payee_windows_of(stored, ats, [b"m3", b"m4"], None, young, None, amounts)
    assert [(w.structured_payers_10m, w.structured_payers_1h) for w in windows] == [
        (1, 2),
        (2, 3),
    ]
    old = NOW - timedelta(days=40)
    windows = _payee_windows_of(stored, ats, [b"m3", b"m4"], None, old, None, amounts)
    assert {(w.structured_payers_10m, w.structured_payers_1h) for w in windows} == {(0, 0)}

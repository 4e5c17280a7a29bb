"""A batch's payee windows (fraud.store._payee_windows_of) against the definition, window
by window: the payee's payments after the cut-off, the batch's earlier ones included,
newest first as the database orders them, capped; whatever the stored rows, the batch
(older or newer than them) and the cap."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from fraud.history import HOUR, PAYEE_WINDOW
from fraud.store import PayeeWindow, _payee_windows_of

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def merged(stored, ats, payers):
    """Each window built from scratch: candidates sorted newest first, cut, capped."""
    earlier, out = [], []
    for position, (at, payer) in enumerate(zip(ats, payers, strict=True), start=1):
        candidates = sorted((*stored, *earlier), reverse=True)
        window = [row for row in candidates if row[0] > at - HOUR][:PAYEE_WINDOW]
        out.append(PayeeWindow(len(window), len({row[3] for row in window})))
        earlier.append((at, 1, position, payer))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fast_windows_equal_the_full_merge(seed):
    rng = random.Random(seed)
    payer_pool = [f"p{i}".encode() for i in range(rng.choice([3, 50, 2_000]))]
    n_stored = rng.choice([0, 10, 999, 1_000, 1_500])
    span = rng.choice([timedelta(seconds=30), timedelta(minutes=70)])
    times = sorted((NOW - span * rng.random() for _ in range(n_stored)), reverse=True)
    stored = [(at, 0, 10_000 - i, rng.choice(payer_pool)) for i, at in enumerate(times)]
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
    assert _payee_windows_of(stored, ats, payers) == merged(stored, ats, payers)


def test_the_window_is_capped_and_counts_distinct_payers():
    stored = [(NOW - timedelta(seconds=i + 1), 0, i, b"old") for i in range(PAYEE_WINDOW)]
    ats = [NOW + timedelta(microseconds=i) for i in range(3)]
    windows = _payee_windows_of(stored, ats, [b"a", b"b", b"a"])
    assert [w.count_1h for w in windows] == [PAYEE_WINDOW] * 3
    assert [w.payers_1h for w in windows] == [1, 2, 3]  # "old", then a, then b

"""The scorers' history in PostgreSQL: what live scoring reads, restart-safe and shared by
every fraud worker. It follows the definitions of :mod:`fraud.history` field by field (a
test holds the two to the same numbers, payment by payment and batch by batch).

A batch is read and recorded with a few set-based statements, whatever its size: the
payee windows of the whole batch (:meth:`HistoryStore.payee_windows`), then for each
round (:func:`split_rounds`) the rest of the history of its payments
(:meth:`HistoryStore.histories`) and their recording (:meth:`HistoryStore.observe_many`).
The histories are those of reading and recording the batch one payment at a time, in
order. Rows get their ids round by round: a payer's rows keep the payer's order, and
across payers an id may differ from the batch's order, which matters only to break a tie
between two payments to one payee at the same microsecond.

With several workers, per-payer windows stay exact because a payer's events are handled
by one worker, in order (one partition); device and payee windows are shared tables, so
each worker sees every payment committed before it looks, and misses those another worker
has not committed yet (at most that worker's batch in flight, as with one payment per
transaction before).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.crypto import MasterKey
from core.polling import PollingWorker
from core.storage import Database, sql_text
from fraud.features import (
    LARGE_MIN_PAISE,
    LARGE_VS_USUAL_MILLI,
    History,
    Txn,
    large_vs_usual,
    milli_log,
    structuring_gap,
)
from fraud.history import (
    DAY,
    HOUR,
    MINUTE,
    PAYEE_WINDOW,
    RECENT,
    TEN_MINUTES,
    USUAL_PLACES,
    cell_centre,
)

__all__ = [
    "HistoryPruner",
    "HistoryStore",
    "PayeeWindow",
    "Pseudonyms",
    "place_aad",
    "seal_clear_places",
    "split_rounds",
]


def _seconds(window: timedelta) -> str:
    """An exact interval: ``interval '1 day'`` would be a calendar day, DST included."""
    return f"interval '{int(window.total_seconds())} seconds'"


# The history of each payment of a round, one row each, in the round's order: each LATERAL
# part is one definition of fraud.history (see there), read by the keys of the payment q.
# Everything here is keyed by the payment's payer or device; the payee's window is read
# apart, once per batch (_READ_PAYEES).
_READ = sql_text(
    f"""
    SELECT payer.c1m, payer.c1h, payer.c24, payer.a1h, payer.a24, payer.devices24,
           payer.prev_at, payer.to_payee10m, known.payments AS ever, known.milli_log_sum,
           recent.median,
           device.c1h AS device_c1h, device.others AS device_others,
           device.others10m AS device_others10m,
           recent.place_counts, recent.place_txns, recent.place_pii,
           last_located.at AS last_at, last_located.transaction_id AS last_txn,
           last_located.place_pii AS last_place,
           devices.is_current AS device_is_current, devices.first_seen AS device_first_seen
    FROM unnest(
        CAST(:payers AS bytea[]), CAST(:devices AS bytea[]), CAST(:ats AS timestamptz[]),
        CAST(:payees AS bytea[])
    ) WITH ORDINALITY AS q(payer, device, at, payee, ord)
    LEFT JOIN fraud_payers known ON known.payer_key = q.payer
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE o.at > q.at - {_seconds(MINUTE)}) AS c1m,
               count(*) FILTER (WHERE o.at > q.at - {_seconds(HOUR)}) AS c1h,
               count(*) AS c24,
               coalesce(sum(o.amount_paise) FILTER (WHERE o.at > q.at - {_seconds(HOUR)}), 0)
                   AS a1h,
               coalesce(sum(o.amount_paise), 0) AS a24,
               count(DISTINCT o.device_key) AS devices24,
               max(o.at) AS prev_at,
               count(*) FILTER (
                   WHERE o.payee_key = q.payee AND o.at > q.at - {_seconds(TEN_MINUTES)}
               ) AS to_payee10m
        FROM fraud_observations o
        WHERE o.payer_key = q.payer AND o.at > q.at - {_seconds(DAY)}
    ) AS payer
    CROSS JOIN LATERAL (
        WITH latest AS (
            SELECT o.id, o.transaction_id, o.amount_paise, o.cell_key, o.place_pii
            FROM fraud_observations o
            WHERE o.payer_key = q.payer ORDER BY o.id DESC LIMIT {RECENT}
        ), places AS (
            -- Each cell of the latest payments (by its pseudonym): how often, and its
            -- latest place, sealed; ranked in Python once opened (_usual_places).
            SELECT count(*) AS n, (array_agg(transaction_id ORDER BY id DESC))[1] AS t,
                   (array_agg(place_pii ORDER BY id DESC))[1] AS s
            FROM latest WHERE cell_key IS NOT NULL GROUP BY cell_key
        )
        SELECT (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY amount_paise) FROM latest)
                   AS median,
               (SELECT array_agg(n ORDER BY t) FROM places) AS place_counts,
               (SELECT array_agg(t ORDER BY t) FROM places) AS place_txns,
               (SELECT array_agg(s ORDER BY t) FROM places) AS place_pii
    ) AS recent
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE o.at > q.at - {_seconds(HOUR)}) AS c1h,
               count(DISTINCT o.payer_key) FILTER (WHERE o.payer_key <> q.payer) AS others,
               count(DISTINCT o.payer_key) FILTER (
                   WHERE o.payer_key <> q.payer AND o.at > q.at - {_seconds(TEN_MINUTES)}
               ) AS others10m
        FROM fraud_observations o
        WHERE o.device_key = q.device AND o.at > q.at - {_seconds(DAY)}
    ) AS device
    LEFT JOIN LATERAL (
        SELECT o.at, o.transaction_id, o.place_pii FROM fraud_observations o
        WHERE o.payer_key = q.payer AND o.place_pii IS NOT NULL ORDER BY o.id DESC LIMIT 1
    ) AS last_located ON true
    CROSS JOIN LATERAL (
        SELECT array_agg(d.device_key = q.device) AS is_current,
               array_agg(d.first_seen) AS first_seen
        FROM fraud_payer_devices d WHERE d.payer_key = q.payer
    ) AS devices
    ORDER BY q.ord
    """
)

# Each payment's payee window, for a whole batch, read before any of it is recorded: the
# recorded payments to the payee, plus the batch's earlier ones, placed after every
# recorded one as they would be if the batch were handled one payment at a time.
# The latest payments to each payee of a batch, within the hour before its earliest payment
# in the batch (the day, for a payee first paid less than a day before: all of a young
# payee's payments, capped the same): an index scan backwards, at most PAYEE_WINDOW rows a
# payee, each with whether it was its payer's first payment, whether it was far above its
# payer's usual, and its amount (structured or not); and the payee's earliest payment (its
# age), one index probe. Each payment's own window is a part of these (a later cut-off
# keeps a prefix of them), merged with the batch's earlier payments to that payee, in
# Python (:func:`_payee_windows_of`). The rows with a negative ``ord`` are the batch's
# payers' counts and usual amounts (``fraud_payers``): whether a batch's earlier payment to
# the payee was its payer's first, or far above its usual, is known before its own round
# reads it. A payee with no payment in the hour still has one row (its earliest payment,
# or none), for its age.
_READ_PAYEES = sql_text(
    f"""
    SELECT q.ord, w.payer_key, w.at, w.id, w.payer_new, w.payer_large, w.amount_paise,
           earliest.at AS first_at, CAST(NULL AS bigint) AS milli_log_sum
    FROM unnest(CAST(:payees AS bytea[]), CAST(:since AS timestamptz[]))
        WITH ORDINALITY AS q(payee, since, ord)
    LEFT JOIN LATERAL (
        SELECT o.at FROM fraud_observations o WHERE o.payee_key = q.payee
        ORDER BY o.at LIMIT 1
    ) AS earliest ON true
    LEFT JOIN LATERAL (
        SELECT o.payer_key, o.at, o.id, o.payer_new, o.payer_large, o.amount_paise
        FROM fraud_observations o
        WHERE o.payee_key = q.payee AND o.at > CASE
            -- A payee first paid less than a day before the batch's earliest payment to
            -- it: its day (all of it), for the young payee's payers so far.
            WHEN earliest.at > q.since - {_seconds(DAY - HOUR)}
            THEN q.since - {_seconds(DAY - HOUR)} ELSE q.since END
        ORDER BY o.at DESC, o.id DESC LIMIT {PAYEE_WINDOW}
    ) AS w ON true
    UNION ALL
    SELECT -b.ord, b.payer, CAST(NULL AS timestamptz), p.payments, CAST(NULL AS boolean),
           CAST(NULL AS boolean), CAST(NULL AS bigint), CAST(NULL AS timestamptz),
           p.milli_log_sum
    FROM unnest(CAST(:payers AS bytea[])) WITH ORDINALITY AS b(payer, ord)
    JOIN fraud_payers p ON p.payer_key = b.payer
    """
)


def _payee_windows_of(
    stored: Sequence[tuple[datetime, int, int, bytes, bool, bool, int]],
    ats: Sequence[datetime],
    payers: Sequence[bytes],
    new: Sequence[bool] | None = None,
    first: datetime | None = None,
    large: Sequence[bool] | None = None,
    amounts: Sequence[int] | None = None,
) -> list[PayeeWindow]:
    """The windows of a batch's payments to one payee, in batch order: each is its payee's
    latest ``PAYEE_WINDOW`` payments in the hour before it, the batch's earlier ones
    included, ordered as the database orders them (by time; at the same time the batch's
    own are the newer; then by arrival), and its part in the last 10 minutes. ``stored``:
    the payee's stored payments as ``(at, 0, id, payer, payer_new, payer_large,
    amount_paise)``, the
    latest ``PAYEE_WINDOW`` after the batch's earliest cut-off; ``new``: whether each batch
    payment is its payer's first; ``first``: the payee's earliest stored payment;
    ``large``: whether each batch payment is well above its payer's usual; ``amounts``:
    each batch payment's amount (whether it is structured).

    The candidates are kept in one ascending list (a batch's payment is inserted in its
    place once counted): a payment's window is the top of the part after its cut-off, so
    each costs a few bisections and two sets of at most ``PAYEE_WINDOW`` payers, in C. The
    payments with a flag (new payer, far above usual, structured) are also kept in a list
    of their own per flag, so that counting the flagged payers of a window reads only
    those; the structured and far-above-usual counts are made for a young payee only (a
    payee first paid less than a day before), 0 for an older one, as the definitions
    say."""
    rows = sorted(
        ((at, flag, seq), payer, is_new, is_large, structuring_gap(amount) is not None)
        for at, flag, seq, payer, is_new, is_large, amount in stored
    )
    keys = [row[0] for row in rows]
    who = [row[1] for row in rows]
    # Per flag, the keys and payers of the payments that have it, ascending like ``keys``:
    # whether it was its payer's first payment, far above its payer's usual, structured.
    flagged = [_Flagged.of(rows, column) for column in (2, 3, 4)]
    new = new if new is not None else [False] * len(ats)
    large = large if large is not None else [False] * len(ats)
    amounts = amounts if amounts is not None else [0] * len(ats)
    windows = []
    for position, (at, payer, is_new, is_large, amount) in enumerate(
        zip(ats, payers, new, large, amounts, strict=True), start=1
    ):
        newer = bisect.bisect_right(keys, (at - HOUR, 2, 0))  # the first after the cut-off
        start = max(newer, len(keys) - PAYEE_WINDOW)
        start10 = max(bisect.bisect_right(keys, (at - TEN_MINUTES, 2, 0)), start)
        # The first key of each window (None: the window is empty).
        from_1h = keys[start] if start < len(keys) else None
        from_10m = keys[start10] if start10 < len(keys) else None
        hour_payers = len(set(who[start:]))
        new_payers, large_payers, structured_payers = flagged
        # A payee first paid less than a day ago: all of its (latest) payments.
        young = first is not None and at - first < DAY
        if young:
            start_day = max(bisect.bisect_right(keys, (at - DAY, 2, 0)), len(keys) - PAYEE_WINDOW)
            from_day = keys[start_day] if start_day < len(keys) else None
            day_payers = hour_payers if start_day == start else len(set(who[start_day:]))
            young_counts = (
                structured_payers.payers_from(from_10m),
                structured_payers.payers_from(from_1h),
                day_payers,
                large_payers.payers_from(from_day),
            )
        else:
            young_counts = (0, 0, 0, 0)
        windows.append(
            PayeeWindow(
                len(keys) - start,
                hour_payers,
                len(set(who[start10:])),
                new_payers.payers_from(from_10m),
                new_payers.payers_from(from_1h),
                first,
                *young_counts,
            )
        )
        key = (at, 1, position)
        place = bisect.bisect_right(keys, key)
        keys.insert(place, key)
        who.insert(place, payer)
        for flags, has in zip(
            flagged, (is_new, is_large, structuring_gap(amount) is not None), strict=True
        ):
            if has:
                flags.insert(key, payer)
        first = at if first is None else min(first, at)
    return windows


class _Flagged:
    """The payments of a payee's window that have one flag: their keys, ascending, and
    their payers."""

    __slots__ = ("keys", "who")

    def __init__(self, keys: list[tuple[datetime, int, int]], who: list[bytes]) -> None:
        self.keys = keys
        self.who = who

    @classmethod
    def of(cls, rows: Sequence[tuple[Any, ...]], column: int) -> _Flagged:
        chosen = [row for row in rows if row[column]]
        return cls([row[0] for row in chosen], [row[1] for row in chosen])

    def payers_from(self, key: tuple[datetime, int, int] | None) -> int:
        """The distinct payers of the flagged payments from ``key`` on (None: none)."""
        if key is None:
            return 0
        return len(set(self.who[bisect.bisect_left(self.keys, key) :]))

    def insert(self, key: tuple[datetime, int, int], payer: bytes) -> None:
        place = bisect.bisect_right(self.keys, key)
        self.keys.insert(place, key)
        self.who.insert(place, payer)


# Records a round: its payments in order, each payer's count, each payer's devices first
# seen. The three inserts are one statement; the counts and devices follow only the
# payments inserted now (a payment recorded before adds nothing). Payers' rows are
# written in key order, so that two transactions never wait for each other's rows in
# opposite orders.
_OBSERVE = sql_text(
    f"""
    WITH given AS (
        SELECT * FROM unnest(
            CAST(:ts AS text[]), CAST(:payers AS bytea[]), CAST(:devices AS bytea[]),
            CAST(:payees AS bytea[]), CAST(:amounts AS bigint[]), CAST(:ats AS timestamptz[]),
            CAST(:cells AS bytea[]), CAST(:places AS bytea[]), CAST(:mlogs AS bigint[])
        ) WITH ORDINALITY AS u(transaction_id, payer_key, device_key, payee_key, amount_paise,
                               at, cell_key, place_pii, milli_log, ord)
    ), batch AS (
        -- Each payment's payer as it was before it: the recorded count and usual (one
        -- primary-key probe), plus the payer's earlier payments in this statement.
        SELECT g.*, row_number() OVER w = 1 AS first_of_payer,
               coalesce(p.payments, 0) + row_number() OVER w - 1 AS before_n,
               coalesce(p.milli_log_sum, 0) + coalesce(sum(g.milli_log) OVER (
                   w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before_sum,
               p.payer_key IS NULL AS unknown
        FROM given g LEFT JOIN fraud_payers p ON p.payer_key = g.payer_key
        WINDOW w AS (PARTITION BY g.payer_key ORDER BY g.ord)
    ), inserted AS (
        INSERT INTO fraud_observations (transaction_id, payer_key, device_key, payee_key,
                                        amount_paise, at, cell_key, place_pii, payer_new,
                                        payer_large)
        SELECT transaction_id, payer_key, device_key, payee_key, amount_paise, at, cell_key,
               place_pii, first_of_payer AND unknown,
               -- fraud.features.large_vs_usual
               before_n > 0 AND amount_paise >= {LARGE_MIN_PAISE}
               AND milli_log * before_n >= before_sum + {LARGE_VS_USUAL_MILLI} * before_n
        FROM batch ORDER BY ord
        ON CONFLICT (transaction_id) DO NOTHING
        RETURNING transaction_id
    ), recorded AS (
        SELECT batch.* FROM batch JOIN inserted USING (transaction_id)
    ), payers AS (
        INSERT INTO fraud_payers (payer_key, payments, milli_log_sum)
        SELECT payer_key, count(*), sum(milli_log) FROM recorded
        GROUP BY payer_key ORDER BY payer_key
        ON CONFLICT (payer_key) DO UPDATE SET
            payments = fraud_payers.payments + EXCLUDED.payments,
            milli_log_sum = fraud_payers.milli_log_sum + EXCLUDED.milli_log_sum
    ), devices AS (
        INSERT INTO fraud_payer_devices (payer_key, device_key, first_seen)
        SELECT DISTINCT ON (payer_key, device_key) payer_key, device_key, at
        FROM recorded WHERE device_key IS NOT NULL ORDER BY payer_key, device_key, ord
        ON CONFLICT DO NOTHING
    )
    SELECT transaction_id FROM inserted
    """
)


class Pseudonyms(NamedTuple):
    """A payment's keys in the history (computed once, for reading and recording)."""

    payer: bytes
    device: bytes | None
    payee: bytes


class PayeeWindow(NamedTuple):
    """``History.payee_count_1h``, ``payee_payers_1h``, ``payee_payers_10m``,
    ``payee_new_payers_10m``, ``payee_new_payers_1h``, the payee's earliest payment,
    ``payee_structured_payers_10m`` / ``_1h``, ``young_payee_payers`` and
    ``young_payee_large_payers``."""

    count_1h: int
    payers_1h: int
    payers_10m: int = 0
    new_payers_10m: int = 0
    new_payers_1h: int = 0
    first_at: datetime | None = None
    structured_payers_10m: int = 0
    structured_payers_1h: int = 0
    young_payers: int = 0
    young_large_payers: int = 0


def split_rounds(txns: Sequence[Txn]) -> list[list[int]]:
    """The positions of ``txns`` in rounds: no payer and no device twice in a round, and a
    payment in a later round than every earlier payment of its payer or device.

    A round is read at once and recorded before the next is read. Each payment is put in
    the first round after those of its payer's and its device's earlier payments: then it
    sees all of those in its history, and none of their later ones; the payments of other
    payers on other devices do not touch what it reads (the payee's window is read apart,
    :meth:`HistoryStore.payee_windows`). So the histories are those of reading and
    recording ``txns`` one at a time, in order, in as few rounds as the repeats allow (a
    burst of ten payments by one payer takes ten). Each round lists its payments in
    ``txns``'s order."""
    rounds: list[list[int]] = []
    after_payer: dict[str, int] = {}
    after_device: dict[str, int] = {}
    for i, txn in enumerate(txns):
        k = after_payer.get(txn.payer, 0)
        if txn.device_id is not None:
            k = max(k, after_device.get(txn.device_id, 0))
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
        after_payer[txn.payer] = k + 1
        if txn.device_id is not None:
            after_device[txn.device_id] = k + 1
    return rounds


def place_aad(transaction_id: str) -> bytes:
    """What a payment's sealed place is bound to: its observation."""
    return b"fraud_observations|" + transaction_id.encode()


def seal_place(master: MasterKey, transaction_id: str, place: tuple[float, float]) -> bytes:
    """A payment's ``place_pii``: its place, sealed to its observation."""
    return master.seal_pii(list(place), place_aad(transaction_id))


def _place(master: MasterKey, transaction_id: str, sealed: bytes) -> tuple[float, float]:
    """What :func:`seal_place` sealed."""
    lat, lon = master.open_pii(bytes(sealed), place_aad(transaction_id))
    return (float(lat), float(lon))


def _usual_places(master: MasterKey, row: Any) -> tuple[tuple[float, float], ...]:
    """The payer's usual places from its cells' counts and latest places: ranked as
    :func:`fraud.history.usual_places` ranks them (most often first, then by the cell)."""
    cells = [
        (cell_centre(_place(master, t, s)), int(n))
        for n, t, s in zip(
            row.place_counts or (), row.place_txns or (), row.place_pii or (), strict=True
        )
    ]
    cells.sort(key=lambda cell: (-cell[1], cell[0]))
    return tuple(centre for centre, _ in cells[:USUAL_PLACES])


def _history(master: MasterKey, row: Any, payee: PayeeWindow, txn: Txn) -> History:
    at = txn.at
    since_change: float | None = None
    known = False
    devices = list(zip(row.device_is_current or [], row.device_first_seen or [], strict=True))
    if txn.device_id is not None and devices:
        known = any(bool(is_current) for is_current, _ in devices)
        current = next((first for is_cur, first in devices if is_cur), at)
        if any(first < current for is_cur, first in devices if not is_cur):
            since_change = (at - current).total_seconds()
    last = _place(master, row.last_txn, row.last_place) if row.last_at is not None else None
    return History(
        payer_count_1m=row.c1m,
        payer_count_1h=row.c1h,
        payer_count_24h=row.c24,
        payer_amount_1h=int(row.a1h),
        payer_amount_24h=int(row.a24),
        payer_payments_ever=int(row.ever or 0),
        payer_median_amount=int(row.median or 0),
        device_count_1h=row.device_c1h if txn.device_id else 0,
        device_vpas_24h=row.device_others if txn.device_id else 0,
        payee_count_1h=payee.count_1h,
        payee_payers_1h=payee.payers_1h,
        device_known_for_payer=known,
        payer_devices_ever=len(devices),
        seconds_since_device_change=since_change,
        last_location=last,
        seconds_since_last=(at - row.last_at).total_seconds() if row.last_at else None,
        usual_places=_usual_places(master, row),
        payee_first_seen_s=(at - payee.first_at).total_seconds() if payee.first_at else None,
        payee_payers_10m=payee.payers_10m,
        payee_new_payers_10m=payee.new_payers_10m,
        payee_new_payers_1h=payee.new_payers_1h,
        device_payers_10m=row.device_others10m if txn.device_id else 0,
        payer_devices_24h=int(row.devices24),
        seconds_since_prev=(at - row.prev_at).total_seconds() if row.prev_at else None,
        payer_to_payee_10m=int(row.to_payee10m),
        young_payee_payers=payee.young_payers,
        young_payee_large_payers=payee.young_large_payers,
        payee_structured_payers_10m=payee.structured_payers_10m,
        payee_structured_payers_1h=payee.structured_payers_1h,
        payer_milli_log_sum=int(row.milli_log_sum or 0),
    )


class HistoryStore:
    """Reads a batch as :mod:`fraud.assessor` does: :meth:`payee_windows` for the whole
    batch first, then for each round (:func:`split_rounds`) :meth:`histories` and
    :meth:`observe_many`. :meth:`history` and :meth:`observe` are the same for one
    payment."""

    def __init__(self, master_key: MasterKey) -> None:
        self._key = master_key

    def cell_key(self, location: tuple[float, float]) -> bytes:
        """The keyed pseudonym of a place's 0.1° cell: usual places are counted by it."""
        lat, lon = cell_centre(location)
        return self._key.pseudonym(f"{lat:.2f},{lon:.2f}", "cell")

    def pseudonyms(self, txn: Txn) -> Pseudonyms:
        key = self._key.pseudonym
        return Pseudonyms(
            key(txn.payer, "payer"),
            key(txn.device_id, "device") if txn.device_id else None,
            key(txn.payee, "payee"),
        )

    async def payee_windows(
        self,
        conn: AsyncConnection,
        txns: Sequence[Txn],
        keys: Sequence[Pseudonyms] | None = None,
    ) -> list[PayeeWindow]:
        """Each payment's payee window, the batch's earlier payments included, in one
        statement (:data:`_READ_PAYEES`). Read before recording any payment of the batch."""
        if not txns:
            return []
        keys = keys or [self.pseudonyms(t) for t in txns]
        since: dict[bytes, datetime] = {}
        for txn, key in zip(txns, keys, strict=True):
            cutoff = txn.at - HOUR
            since[key.payee] = min(since.get(key.payee, cutoff), cutoff)
        payees = list(since)
        batch_payers = list(dict.fromkeys(k.payer for k in keys))
        rows = await conn.execute(
            _READ_PAYEES,
            {"payees": payees, "since": [since[p] for p in payees], "payers": batch_payers},
        )
        stored: dict[bytes, list[tuple[datetime, int, int, bytes, bool, bool, int]]] = {
            p: [] for p in payees
        }
        first: dict[bytes, datetime | None] = {}
        counted: dict[bytes, int] = {}
        summed: dict[bytes, int] = {}
        for row in rows:
            if row.ord < 0:  # a batch payer's count and usual
                counted[bytes(row.payer_key)] = int(row.id)
                summed[bytes(row.payer_key)] = int(row.milli_log_sum)
                continue
            payee = payees[row.ord - 1]
            first[payee] = row.first_at
            if row.at is not None:
                stored[payee].append(
                    (
                        row.at,
                        0,
                        row.id,
                        bytes(row.payer_key),
                        bool(row.payer_new),
                        bool(row.payer_large),
                        int(row.amount_paise),
                    )
                )
        # Whether each payment is its payer's first (none recorded, none earlier in the
        # batch) and whether it is well above its payer's usual, the batch's earlier
        # payments counted in.
        new: list[bool] = []
        large: list[bool] = []
        for txn, key in zip(txns, keys, strict=True):
            n, total = counted.get(key.payer, 0), summed.get(key.payer, 0)
            new.append(n == 0)
            large.append(large_vs_usual(txn.amount_paise, n, total))
            counted[key.payer] = n + 1
            summed[key.payer] = total + milli_log(txn.amount_paise)
        positions: dict[bytes, list[int]] = {p: [] for p in payees}
        for position, key in enumerate(keys):
            positions[key.payee].append(position)
        windows: list[PayeeWindow] = [PayeeWindow(0, 0)] * len(txns)
        for payee, mine in positions.items():
            found = _payee_windows_of(
                stored[payee],
                [txns[i].at for i in mine],
                [keys[i].payer for i in mine],
                [new[i] for i in mine],
                first.get(payee),
                [large[i] for i in mine],
                [txns[i].amount_paise for i in mine],
            )
            for i, window in zip(mine, found, strict=True):
                windows[i] = window
        return windows

    async def histories(
        self,
        conn: AsyncConnection,
        txns: Sequence[Txn],
        payee: Sequence[PayeeWindow],
        keys: Sequence[Pseudonyms] | None = None,
    ) -> list[History]:
        """The history of each payment of a round, in one statement (``payee``: their
        windows from :meth:`payee_windows`)."""
        if not txns:
            return []
        keys = keys or [self.pseudonyms(t) for t in txns]
        rows = (
            await conn.execute(
                _READ,
                {
                    "payers": [k.payer for k in keys],
                    "devices": [k.device for k in keys],
                    "ats": [t.at for t in txns],
                    "payees": [k.payee for k in keys],
                },
            )
        ).all()
        return [_history(self._key, *parts) for parts in zip(rows, payee, txns, strict=True)]

    async def history(self, conn: AsyncConnection, txn: Txn) -> History:
        keys = [self.pseudonyms(txn)]
        payee = await self.payee_windows(conn, [txn], keys)
        return (await self.histories(conn, [txn], payee, keys))[0]

    async def observe_many(
        self,
        conn: AsyncConnection,
        transaction_ids: Sequence[str],
        txns: Sequence[Txn],
        keys: Sequence[Pseudonyms] | None = None,
    ) -> set[str]:
        """Record the payments, in order, in one statement; the transaction ids recorded
        now (one recorded before changes nothing)."""
        if not txns:
            return set()
        keys = keys or [self.pseudonyms(t) for t in txns]
        rows = await conn.execute(
            _OBSERVE,
            {
                "ts": list(transaction_ids),
                "payers": [k.payer for k in keys],
                "devices": [k.device for k in keys],
                "payees": [k.payee for k in keys],
                "amounts": [t.amount_paise for t in txns],
                "ats": [t.at for t in txns],
                "cells": [self.cell_key(t.location) if t.location else None for t in txns],
                "places": [
                    seal_place(self._key, tid, t.location) if t.location else None
                    for tid, t in zip(transaction_ids, txns, strict=True)
                ],
                "mlogs": [milli_log(t.amount_paise) for t in txns],
            },
        )
        return {str(r[0]) for r in rows}

    async def observe(self, conn: AsyncConnection, transaction_id: str, txn: Txn) -> bool:
        """Record the payment; False (and nothing changed) if it was recorded before."""
        return bool(await self.observe_many(conn, [transaction_id], [txn]))

    async def prune(self, conn: AsyncConnection, before: datetime, limit: int = 5_000) -> int:
        """Forget up to ``limit`` payments made before ``before``, and the payers of those
        who have no payment left within the retention (their count and their devices: if
        they come back they are new again); how many rows went. A payer with a payment
        within the retention keeps their count and devices. One statement."""
        deleted = await conn.execute(_PRUNE, {"before": before, "n": limit})
        return int(deleted.scalar_one())


# Payments by age (index fraud_obs_at); then the payers of those payments that have none
# left within the retention (index fraud_obs_payer_at), with their devices. (The statement
# sees the table as it was before its own deletes, hence "none at or after the cut-off"
# rather than "none left".) A payer's row is thus never touched by the hot path for
# pruning's sake: no column to keep up to date on every payment.
_PRUNE = sql_text(
    """
    WITH payments AS (
        DELETE FROM fraud_observations WHERE id IN (
            SELECT id FROM fraud_observations WHERE at < :before ORDER BY at LIMIT :n
        ) RETURNING payer_key
    ), payers AS (
        DELETE FROM fraud_payers p
        WHERE p.payer_key IN (SELECT DISTINCT payer_key FROM payments)
          AND NOT EXISTS (
              SELECT 1 FROM fraud_observations o
              WHERE o.payer_key = p.payer_key AND o.at >= :before
          )
        RETURNING p.payer_key
    ), devices AS (
        DELETE FROM fraud_payer_devices d USING payers WHERE d.payer_key = payers.payer_key
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM payments) + (SELECT count(*) FROM payers)
           + (SELECT count(*) FROM devices)
    """
)


class HistoryPruner(PollingWorker):
    """Keeps the fraud history to its retention: deletes older payments in batches, then
    looks again an hour later."""

    name = "fraud history pruning"

    def __init__(
        self,
        db: Database,
        store: HistoryStore,
        clock: Clock,
        retention: timedelta,
        interval_s: float = 3_600.0,
    ) -> None:
        super().__init__(interval_s)
        self._db = db
        self._store = store
        self._clock = clock
        self._retention = retention

    async def prune_once(self) -> int:
        async with self._db.transaction() as conn:
            return await self._store.prune(conn, self._clock.now() - self._retention)

    async def step(self) -> int:
        return await self.prune_once()


_CLEAR_PLACES = sql_text(
    "SELECT id, transaction_id, lat, lon FROM fraud_observations"
    " WHERE lat IS NOT NULL OR lon IS NOT NULL ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
)
_SEAL_PLACES = sql_text(
    "UPDATE fraud_observations AS o SET cell_key = u.c, place_pii = u.s, lat = NULL,"
    " lon = NULL FROM unnest(CAST(:ids AS bigint[]), CAST(:c AS bytea[]), CAST(:s AS bytea[]))"
    " AS u(id, c, s) WHERE o.id = u.id"
)
_CLEAR_HALF_PLACES = sql_text(
    "UPDATE fraud_observations SET lat = NULL, lon = NULL WHERE id = ANY(CAST(:ids AS bigint[]))"
)


async def seal_clear_places(db: Database, master: MasterKey, batch: int = 1_000) -> int:
    """Seal the clear places of observations recorded before migration ``fraud.0004``, as
    :meth:`HistoryStore.observe_many` seals new ones; returns how many were sealed. Half a
    place (a latitude without its longitude, or the reverse) is no place: emptied, not
    sealed as a point that was never observed."""
    store = HistoryStore(master)
    sealed = 0
    while True:
        async with db.transaction() as conn:
            rows = (await conn.execute(_CLEAR_PLACES, {"n": batch})).all()
            if not rows:
                return sealed
            half = [r.id for r in rows if r.lat is None or r.lon is None]
            if half:
                await conn.execute(_CLEAR_HALF_PLACES, {"ids": half})
            rows = [r for r in rows if r.lat is not None and r.lon is not None]
            places = [(float(r.lat), float(r.lon)) for r in rows]
            await conn.execute(
                _SEAL_PLACES,
                {
                    "ids": [r.id for r in rows],
                    "c": [store.cell_key(place) for place in places],
                    "s": [
                        seal_place(master, r.transaction_id, place)
                        for r, place in zip(rows, places, strict=True)
                    ],
                },
            )
        sealed += len(rows)

"""The scorers' history in PostgreSQL: what live scoring reads, restart-safe and shared by
every fraud worker. It follows the definitions of :mod:`fraud.history` field by field (a
test holds the two to the same numbers); one statement reads it all.

With several workers, per-payer windows stay exact because a payer's events are handled
one at a time (one partition, one lane); device and payee windows are shared tables, so
each worker sees every payment committed before it looks.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.crypto import MasterKey
from core.polling import PollingWorker
from core.storage import Database, sql_text
from fraud.features import History, Txn
from fraud.history import DAY, HOUR, MINUTE, PAYEE_WINDOW, RECENT, USUAL_PLACES

__all__ = ["HistoryPruner", "HistoryStore"]

_READ = sql_text(
    f"""
    WITH payer AS (
        SELECT count(*) FILTER (WHERE at > :t1m) AS c1m,
               count(*) FILTER (WHERE at > :t1h) AS c1h,
               count(*) AS c24,
               coalesce(sum(amount_paise) FILTER (WHERE at > :t1h), 0) AS a1h,
               coalesce(sum(amount_paise), 0) AS a24
        FROM fraud_observations WHERE payer_key = :payer AND at > :t24h
    ), recent AS (
        SELECT amount_paise, at, lat, lon, id FROM fraud_observations
        WHERE payer_key = :payer ORDER BY id DESC LIMIT {RECENT}
    ), device AS (
        SELECT count(*) FILTER (WHERE at > :t1h) AS c1h,
               count(DISTINCT payer_key) FILTER (WHERE payer_key <> :payer) AS others
        FROM fraud_observations
        WHERE device_key = CAST(:device AS bytea) AND at > :t24h
    ), payee AS (
        SELECT count(*) AS c1h, count(DISTINCT payer_key) AS payers FROM (
            SELECT payer_key FROM fraud_observations WHERE payee_key = :payee AND at > :t1h
            ORDER BY at DESC, id DESC LIMIT {PAYEE_WINDOW}
        ) AS latest
    ), last_located AS (
        SELECT at, lat, lon FROM fraud_observations
        WHERE payer_key = :payer AND lat IS NOT NULL ORDER BY id DESC LIMIT 1
    ), places AS (
        SELECT floor(lat * 10) / 10 + 0.05 AS plat, floor(lon * 10) / 10 + 0.05 AS plon,
               count(*) AS n
        FROM recent WHERE lat IS NOT NULL GROUP BY 1, 2
        ORDER BY n DESC, plat, plon LIMIT {USUAL_PLACES}
    )
    SELECT payer.*,
           (SELECT payments FROM fraud_payers WHERE payer_key = :payer) AS ever,
           (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY amount_paise) FROM recent)
               AS median,
           device.c1h AS device_c1h, device.others AS device_others,
           payee.c1h AS payee_c1h, payee.payers AS payee_payers,
           (SELECT array_agg(ARRAY[plat, plon] ORDER BY n DESC, plat, plon) FROM places)
               AS places,
           (SELECT at FROM last_located) AS last_at,
           (SELECT lat FROM last_located) AS last_lat,
           (SELECT lon FROM last_located) AS last_lon,
           (SELECT array_agg(device_key = CAST(:device AS bytea)) FROM fraud_payer_devices
            WHERE payer_key = :payer) AS device_is_current,
           (SELECT array_agg(first_seen) FROM fraud_payer_devices WHERE payer_key = :payer)
               AS device_first_seen
    FROM payer, device, payee
    """
)


class HistoryStore:
    def __init__(self, master_key: MasterKey) -> None:
        self._key = master_key

    def keys(self, txn: Txn) -> dict[str, Any]:
        return {
            "payer": self._key.pseudonym(txn.payer, "payer"),
            "device": self._key.pseudonym(txn.device_id, "device") if txn.device_id else None,
            "payee": self._key.pseudonym(txn.payee, "payee"),
        }

    async def history(self, conn: AsyncConnection, txn: Txn) -> History:
        at = txn.at
        params = {
            **self.keys(txn),
            "t1m": at - MINUTE,
            "t1h": at - HOUR,
            "t24h": at - DAY,
        }
        row = (await conn.execute(_READ, params)).one()
        since_change: float | None = None
        known = False
        devices = list(zip(row.device_is_current or [], row.device_first_seen or [], strict=True))
        if txn.device_id is not None and devices:
            known = any(bool(is_current) for is_current, _ in devices)
            current = next((first for is_cur, first in devices if is_cur), at)
            if any(first < current for is_cur, first in devices if not is_cur):
                since_change = (at - current).total_seconds()
        last = (row.last_lat, row.last_lon) if row.last_at is not None else None
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
            payee_count_1h=row.payee_c1h,
            payee_payers_1h=row.payee_payers,
            device_known_for_payer=known,
            payer_devices_ever=len(devices),
            seconds_since_device_change=since_change,
            last_location=last,
            seconds_since_last=(at - row.last_at).total_seconds() if row.last_at else None,
            usual_places=tuple((float(p[0]), float(p[1])) for p in row.places or ()),
        )

    async def observe(self, conn: AsyncConnection, transaction_id: str, txn: Txn) -> bool:
        """Record the payment; False (and nothing changed) if it was recorded before."""
        keys = self.keys(txn)
        lat, lon = txn.location if txn.location else (None, None)
        inserted = (
            await conn.execute(
                sql_text(
                    "INSERT INTO fraud_observations (transaction_id, payer_key, device_key,"
                    " payee_key, amount_paise, at, lat, lon) VALUES (:t, :payer, :device,"
                    " :payee, :amount, :at, :lat, :lon) ON CONFLICT (transaction_id)"
                    " DO NOTHING RETURNING 1"
                ),
                {
                    **keys,
                    "t": transaction_id,
                    "amount": txn.amount_paise,
                    "at": txn.at,
                    "lat": lat,
                    "lon": lon,
                },
            )
        ).first()
        if inserted is None:
            return False
        await conn.execute(
            sql_text(
                "INSERT INTO fraud_payers (payer_key, payments) VALUES (:payer, 1)"
                " ON CONFLICT (payer_key) DO UPDATE SET payments = fraud_payers.payments + 1"
            ),
            {"payer": keys["payer"]},
        )
        if keys["device"] is not None:
            await conn.execute(
                sql_text(
                    "INSERT INTO fraud_payer_devices (payer_key, device_key, first_seen)"
                    " VALUES (:payer, :device, :at) ON CONFLICT DO NOTHING"
                ),
                {"payer": keys["payer"], "device": keys["device"], "at": txn.at},
            )
        return True

    async def prune(self, conn: AsyncConnection, before: datetime, limit: int = 5_000) -> int:
        """Forget up to ``limit`` payments made before ``before``; how many went. The
        per-payer count and devices stay: they are one row per payer, not per payment."""
        deleted = await conn.execute(
            sql_text(
                "DELETE FROM fraud_observations WHERE id IN (SELECT id FROM fraud_observations"
                " WHERE at < :before ORDER BY at LIMIT :n)"
            ),
            {"before": before, "n": limit},
        )
        return int(deleted.rowcount)


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

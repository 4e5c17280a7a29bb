"""The payer's PII at rest in the payments table: sealed, and kept no longer than needed.

Two jobs, both set-based in batches:

* :func:`seal_clear_payers`: rows written before migration ``payments.0017`` hold the payer's
  VPA and device in clear. SQL has no key, so the first engine that starts after the
  migration seals them (as :func:`payments.repository.insert_payment` does for new rows),
  sets their ``payer_key`` and empties the clear columns, before it serves.
* :class:`PiiPurger`: a final payment keeps its payer's PII for ``UPI_PII_RETENTION_DAYS``
  (400) after it completed: past the refund window and the dispute cycles, which need to
  know whom to credit. Then the sealed payer and its pseudonym are emptied
  (``pii_purged_at`` says when). A payment with a dispute open, a refund pending or a late
  success being returned keeps it until that is done. Old row versions are gone at the
  next vacuum; copies in backups stay sealed under the field key. The compliance ledger
  keeps its own sealed copy for 7 years, which crypto-shredding ends (`keys shred`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import orjson

from core.clock import Clock
from core.crypto import MasterKey
from core.polling import PollingWorker
from core.storage import Database, sql_text
from payments.repository import payer_key, seal_payer

__all__ = ["PiiPurger", "seal_clear_payers"]

_log = logging.getLogger(__name__)

_CLEAR = sql_text(
    "SELECT transaction_id, payer_vpa, device FROM payments WHERE payer_vpa IS NOT NULL"
    " ORDER BY transaction_id LIMIT :n FOR UPDATE SKIP LOCKED"
)
_SEAL = sql_text(
    "UPDATE payments AS p SET payer_key = u.k, payer_pii = u.s, payer_vpa = NULL,"
    " device = NULL"
    " FROM unnest(CAST(:t AS text[]), CAST(:k AS bytea[]), CAST(:s AS bytea[])) AS u(t, k, s)"
    " WHERE p.transaction_id = u.t"
)


def _device(raw: Any) -> Any:
    return orjson.loads(raw) if isinstance(raw, str | bytes) else raw


async def seal_clear_payers(db: Database, master: MasterKey, batch: int = 1_000) -> int:
    """Seal every row's clear payer (see the module); returns how many were sealed."""
    sealed = 0
    while True:
        async with db.transaction() as conn:
            rows = (await conn.execute(_CLEAR, {"n": batch})).all()
            if not rows:
                break
            await conn.execute(
                _SEAL,
                {
                    "t": [r.transaction_id for r in rows],
                    "k": [payer_key(master, r.payer_vpa) for r in rows],
                    "s": [
                        seal_payer(master, r.transaction_id, r.payer_vpa.lower(), _device(r.device))
                        for r in rows
                    ],
                },
            )
        sealed += len(rows)
    if sealed:
        _log.warning("sealed the payer of %d payments written before sealing", sealed)
    return sealed


# Final payments past the retention with nothing still owed to or by their payer.
_PURGE = sql_text(
    """
    WITH due AS (
        SELECT p.transaction_id FROM payments p
        WHERE p.completed_at < :before
          AND (p.payer_pii IS NOT NULL OR p.payer_vpa IS NOT NULL)
          AND p.status IN ('SUCCESS', 'FAILED', 'BLOCKED', 'REVERSED')
          AND NOT EXISTS (SELECT 1 FROM disputes d WHERE d.transaction_id = p.transaction_id
                          AND d.status IN ('OPEN', 'CONTESTED'))
          AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.transaction_id = p.transaction_id
                          AND r.status = 'PENDING')
          AND NOT EXISTS (SELECT 1 FROM late_success_returns l
                          WHERE l.transaction_id = p.transaction_id AND l.status = 'PENDING')
        ORDER BY p.completed_at LIMIT :n FOR UPDATE OF p SKIP LOCKED
    )
    UPDATE payments AS p SET payer_pii = NULL, payer_key = NULL, payer_vpa = NULL,
        device = NULL, pii_purged_at = :now
    FROM due WHERE p.transaction_id = due.transaction_id
    """
)


class PiiPurger(PollingWorker):
    """Purges the payer's PII of payments past the retention (see the module)."""

    name = "pii retention purge"

    def __init__(
        self,
        db: Database,
        clock: Clock,
        retention: timedelta,
        interval_s: float = 3600.0,
        batch: int = 1_000,
    ) -> None:
        super().__init__(interval_s)
        self._db = db
        self._clock = clock
        self._retention = retention
        self._batch = batch

    async def purge_due(self) -> int:
        """One batch; how many payments lost their payer's PII."""
        now = self._clock.now()
        async with self._db.transaction() as conn:
            result = await conn.execute(
                _PURGE, {"before": now - self._retention, "n": self._batch, "now": now}
            )
        purged = int(getattr(result, "rowcount", 0) or 0)
        if purged:
            _log.info("purged the payer's PII of %d payments past retention", purged)
        return purged

    async def step(self) -> int:
        return await self.purge_due()

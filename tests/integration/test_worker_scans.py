"""The background workers' scans use their partial indexes: they run every second or so,
and a plan that reads a whole table each time grows with every payment ever made."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import TextClause, text

from payments.late_success import DUE_RETURNS
from payments.npci_handler import DEEMED_DUE, STALE_SUBMISSIONS
from payments.verification import EXPIRED_VERIFICATIONS
from payments.webhooks import DUE_DELIVERIES

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("scan", "params", "index"),
    [
        (DEEMED_DUE, {"now": NOW, "n": 50}, "payments_deemed_due"),
        (STALE_SUBMISSIONS, {"before": NOW, "n": 50}, "payments_submitted_since"),
        (EXPIRED_VERIFICATIONS, {"now": NOW, "n": 100}, "payments_pending_verification"),
        (DUE_DELIVERIES, {"now": NOW, "n": 50}, "webhook_deliveries_due"),
        (DUE_RETURNS, {"now": NOW, "n": 50}, "late_success_returns_due"),
    ],
    ids=[
        "deemed due",
        "stale submissions",
        "expired verifications",
        "due webhooks",
        "due late-success returns",
    ],
)
async def test_worker_scan_uses_its_partial_index(db, scan: TextClause, params, index):
    async with db.transaction() as conn:
        # The tables are small here: forbid plain scans so the plan shows which index
        # the planner can use. Without the partial index it falls back to another one
        # read in full, or to a sequential scan.
        await conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join((await conn.execute(text("EXPLAIN " + scan.text), params)).scalars().all())
    assert index in plan, plan

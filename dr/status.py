"""What ``upi-engine dr status`` and ``GET /v1/dr/status`` report: the database's own view
(is it the primary, which standbys stream from it, synchronously or not, how far behind,
the last failover it took part in), and the orchestrator's routing table when there is one
(``UPI_DR_STATE_FILE``, written by the orchestrator and the drills)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from core.storage import sql_text

__all__ = ["configured_standbys", "dr_status", "standby_counts"]


async def dr_status(conn: AsyncConnection, state_file: Path | None = None) -> dict[str, Any]:
    in_recovery = bool((await conn.execute(sql_text("SELECT pg_is_in_recovery()"))).scalar_one())
    sync_names = (await conn.execute(sql_text("SHOW synchronous_standby_names"))).scalar_one()
    standbys = [
        {
            "name": r.application_name,
            "state": r.state,
            "sync_state": r.sync_state,
            "replay_lag_seconds": r.lag,
        }
        for r in await conn.execute(
            sql_text(
                "SELECT application_name, state, sync_state,"
                " EXTRACT(EPOCH FROM replay_lag)::float AS lag FROM pg_stat_replication"
                " ORDER BY application_name"
            )
        )
    ]
    last = (
        await conn.execute(
            sql_text(
                "SELECT old_primary, new_primary, reason, started_at, completed_at, phases"
                " FROM dr_failovers ORDER BY id DESC LIMIT 1"
            )
        )
    ).first()
    status: dict[str, Any] = {
        "database_role": "standby" if in_recovery else "primary",
        "synchronous_standby_names": sync_names or None,
        "standbys": standbys,
        "last_failover": None
        if last is None
        else {
            "old_primary": last.old_primary,
            "new_primary": last.new_primary,
            "reason": last.reason,
            "started_at": last.started_at.isoformat(),
            "completed_at": last.completed_at.isoformat(),
            "phases": last.phases,
        },
        "orchestrator": None,
    }
    if state_file is not None:
        status["orchestrator"] = _read_state(state_file)
    return status


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state


def configured_standbys(synchronous_standby_names: str | None) -> int:
    """How many standbys ``synchronous_standby_names`` lists: ``ANY 1 (a, b)`` and
    ``FIRST 1 (a, b)`` list 2, ``a, b`` lists 2, ``*`` stands for 1, empty for none."""
    names = (synchronous_standby_names or "").strip()
    if not names:
        return 0
    if "(" in names and names.endswith(")"):
        names = names[names.index("(") + 1 : -1]
    return len([n for n in names.split(",") if n.strip()])


async def standby_counts(conn: AsyncConnection) -> tuple[int, int] | None:
    """(standbys streaming, standbys configured) on a primary; None on a standby."""
    status = await dr_status(conn)
    if status["database_role"] != "primary":
        return None
    streaming = sum(1 for s in status["standbys"] if s["state"] == "streaming")
    return streaming, configured_standbys(status["synchronous_standby_names"])

"""The failover orchestrator: regions, health checks with hysteresis, and the failover of
SPEC §8, phase by phase.

A region is a PostgreSQL cluster (:mod:`dr.cluster`) plus the engine's process for it
(``upi-engine serve`` against that cluster). The primary region's engine takes the
traffic; standby regions stream the primary's WAL and at least one standby must confirm
every commit (``synchronous_standby_names = 'ANY 1 (…)'``: quorum commit), so an
acknowledged payment is on a standby before the merchant hears 202.

Failover, when the primary is lost (:meth:`Orchestrator.failover`):

1. ``stop_ingestion``: the proxy holds new connections; the old region's engine is stopped.
2. ``drain``: the candidate (the standby that received the most WAL; with quorum commit it
   holds every acknowledged commit) replays all it received.
3. ``promote``: ``pg_promote()`` on the candidate.
4. ``fence``: the old primary is killed if anything of it is left, and can from now on
   only start as a standby (:meth:`dr.cluster.Cluster.fence`): no split brain.
5. ``reroute``: the other standbys follow the new primary, which requires one of them to
   confirm commits; the new region's engine starts; the proxy points at it.
6. ``verify``: the outbox drains (the events in flight are published from the new
   primary), the ledger chain verifies without a fork, the counts agree.

``FailoverStarted`` and ``FailoverCompleted`` (with each phase's timing) are written to the
new primary's outbox, so the ledger records them, and to ``dr_failovers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg

from core.events import Envelope, FailoverCompleted, FailoverStarted, PhaseTiming
from core.outbox import append_to_outbox
from core.processes import UPI_ENGINE, EngineProcess
from core.storage import Database
from dr.cluster import Cluster
from dr.proxy import RoutingProxy

__all__ = ["Health", "Orchestrator", "Region", "probe"]

_log = logging.getLogger(__name__)
# Events that existed when the drain began (id up to $1) and that the relay has not passed
# (core/outbox.py reads in (txid, id) order).
_UNPUBLISHED_UP_TO = (
    "SELECT count(*) FROM outbox WHERE id <= $1 AND (txid, id) > COALESCE((SELECT"
    " (last_txid, last_id) FROM outbox_position ORDER BY last_txid DESC, last_id DESC LIMIT 1),"
    " (CAST('0' AS xid8), 0))"
)


@contextlib.asynccontextmanager
async def connect(cluster: Cluster, database: str = "upi") -> AsyncIterator[Any]:
    """A plain asyncpg connection to a region's server (the orchestrator's own checks)."""
    conn = await asyncpg.connect(
        host="127.0.0.1", port=cluster.port, user="postgres", database=database
    )
    try:
        yield conn
    finally:
        await conn.close()


async def probe(cluster: Cluster, within_s: float = 1.0) -> str | None:
    """``"primary"`` / ``"standby"`` if the cluster answers within ``within_s``, else None.

    Any failure to answer is no answer, whatever asyncpg raises: a server dying mid-reply
    can leave the client protocol in a state asyncpg reports as an internal error
    ("another operation is in progress"), and a health check must not crash the
    orchestrator that failovers depend on."""
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=cluster.port, user="postgres", database="upi", timeout=within_s
        )
    except Exception as exc:
        _log.debug("probe %s: no connection: %r", cluster.name, exc)
        return None
    try:
        in_recovery = await asyncio.wait_for(conn.fetchval("SELECT pg_is_in_recovery()"), within_s)
    except Exception as exc:
        _log.debug("probe %s: no answer: %r", cluster.name, exc)
        conn.terminate()  # its state is unknown: drop it rather than close it politely
        return None
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), within_s)
    return "standby" if in_recovery else "primary"


@dataclass
class Health:
    """Hysteresis: down after ``fail_after`` failed checks in a row, up again after
    ``recover_after`` good ones. One slow answer is not a disaster."""

    fail_after: int = 3
    recover_after: int = 2
    up: bool = True
    failures: int = 0
    successes: int = 0

    def record(self, ok: bool) -> bool:
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.up and self.successes >= self.recover_after:
                self.up = True
        else:
            self.failures += 1
            self.successes = 0
            if self.up and self.failures >= self.fail_after:
                self.up = False
        return self.up


@dataclass
class Region:
    name: str
    cluster: Cluster
    engine: EngineProcess
    role: str = "standby"  # primary | standby | fenced | lost
    health: Health = field(default_factory=Health)


def quorum(names: list[str]) -> str:
    return f"ANY 1 ({', '.join(names)})" if names else ""


class Orchestrator:
    def __init__(
        self,
        regions: list[Region],
        proxy: RoutingProxy,
        state_file: Path,
        *,
        interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.regions = {r.name: r for r in regions}
        self.proxy = proxy
        self.state_file = state_file
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.on_phase = on_phase or (lambda _: None)
        self.failovers: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self.busy = asyncio.Lock()

    # ------------------------------------------------------------------ topology

    @property
    def primary(self) -> Region:
        return next(r for r in self.regions.values() if r.role == "primary")

    def standbys(self) -> list[Region]:
        return [r for r in self.regions.values() if r.role == "standby"]

    def save_state(self) -> None:
        state = {
            "primary": self.primary.name,
            "proxy": self.proxy.url,
            "regions": {
                r.name: {
                    "role": r.role,
                    "port": r.cluster.port,
                    "engine": r.engine.url,
                    "healthy": r.health.up,
                    "data_dir": str(r.cluster.data_dir),
                }
                for r in self.regions.values()
            },
            "failovers": self.failovers,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    async def set_sync_standbys(self, primary: Region, names: list[str]) -> None:
        async with connect(primary.cluster, "postgres") as conn:
            await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{quorum(names)}'")
            await conn.execute("SELECT pg_reload_conf()")

    # ------------------------------------------------------------------ watching

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.check_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def check_once(self) -> None:
        async with self.busy:
            for region in list(self.regions.values()):
                if region.role not in ("primary", "standby"):
                    continue
                seen = await probe(region.cluster, self.probe_timeout_s)
                expected = "primary" if region.role == "primary" else "standby"
                up = region.health.record(seen == expected)
                if up:
                    continue
                if region.role == "primary":
                    await self.failover(
                        f"primary {region.name} failed {region.health.fail_after}"
                        " health checks in a row"
                    )
                else:
                    await self.standby_lost(region)
            self.save_state()

    # ------------------------------------------------------------------ standby loss

    async def standby_lost(self, region: Region) -> dict[str, Any]:
        """Re-point replication: the primary stops waiting for the lost standby, which is
        rebuilt from the primary and added back once it streams again."""
        _log.warning("standby %s lost", region.name)
        region.role = "lost"
        primary = self.primary
        phases: list[PhaseTiming] = []

        async def timed(name: str, work: Callable[[], Any], detail: str) -> None:
            self.on_phase(name)
            begun = time.monotonic()
            await work()
            phases.append(
                PhaseTiming(name=name, seconds=round(time.monotonic() - begun, 3), detail=detail)
            )

        remaining = [r.name for r in self.standbys()]
        await timed(
            "repoint",
            lambda: self.set_sync_standbys(primary, remaining),
            f"{primary.name} commits wait for {remaining or 'no standby'} only",
        )
        await timed(
            "rebuild",
            lambda: asyncio.to_thread(region.cluster.rebuild_from, primary.cluster),
            f"pg_basebackup of {region.name} from {primary.name}",
        )
        await timed(
            "rejoin",
            lambda: self.rejoin_started(region),
            f"{region.name} streams and confirms commits again",
        )
        report = {
            "event": "standby_rebuilt",
            "region": region.name,
            "seconds": round(sum(p.seconds for p in phases), 3),
            "phases": [p.model_dump() for p in phases],
        }
        self.failovers.append(report)
        self.save_state()
        return report

    async def rejoin_started(self, region: Region) -> None:
        await asyncio.to_thread(region.cluster.start)
        region.role = "standby"
        region.health = Health()
        if not region.engine.running:  # warm again: it waits, loaded, for a promotion
            await asyncio.to_thread(region.engine.spawn)
        primary = self.primary
        names = [r.name for r in self.standbys()]
        await self.set_sync_standbys(primary, await self.wait_streaming(primary, names))

    async def wait_streaming(
        self, primary: Region, names: list[str], wait_s: float = 15
    ) -> list[str]:
        """The standbys among ``names`` streaming from ``primary`` (waits up to ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        async with connect(primary.cluster, "postgres") as conn:
            while True:
                rows = await conn.fetch(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
                )
                streaming = sorted({r["application_name"] for r in rows} & set(names))
                if len(streaming) == len(names) or time.monotonic() > deadline:
                    return streaming
                await asyncio.sleep(0.1)

    async def wait_for(self, condition: Callable[[], bool], wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the orchestrator did not act in time")
            await asyncio.sleep(0.1)

    async def rejoin(self, region: Region) -> None:
        """Rebuild a fenced or lost region as a standby of the current primary."""
        await asyncio.to_thread(region.cluster.rebuild_from, self.primary.cluster)
        await self.rejoin_started(region)
        self.save_state()

    async def switchover(self, target: Region, reason: str) -> dict[str, Any]:
        """A planned failover to ``target`` (a streaming standby): the primary is stopped
        cleanly first, so the target has every commit before it is promoted."""
        old = self.primary
        self.proxy.pause()
        await asyncio.to_thread(old.engine.stop)
        await asyncio.to_thread(old.cluster.stop)
        return await self.failover(reason, candidate=target)

    # ------------------------------------------------------------------ failover

    async def failover(self, reason: str, candidate: Region | None = None) -> dict[str, Any]:
        old = self.primary
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        phases: list[PhaseTiming] = []

        async def phase(name: str, work: Callable[[], Any]) -> Any:
            self.on_phase(name)
            begun = time.monotonic()
            result = await work()
            detail = result if isinstance(result, str) else None
            phases.append(
                PhaseTiming(name=name, seconds=round(time.monotonic() - begun, 3), detail=detail)
            )
            return result

        async def stop_ingestion() -> str:
            self.proxy.pause()
            await asyncio.to_thread(old.engine.stop, True)
            return f"proxy paused; {old.name} engine stopped"

        chosen: Region | None = None
        candidates = [r for r in self.standbys() if await probe(r.cluster, 2.0) == "standby"]
        if candidate is not None:
            candidates = [r for r in candidates if r is candidate]
        if not candidates:
            raise RuntimeError("no standby is reachable: cannot fail over")

        async def drain() -> str:
            nonlocal chosen
            best, best_lsn = None, -1
            for region in candidates:
                lsn = await _received_lsn(region.cluster)
                await _wait_replayed(region.cluster, wait_s=30)
                if lsn > best_lsn:
                    best, best_lsn = region, lsn
            assert best is not None
            chosen = best
            return f"{best.name} has the most WAL ({best_lsn})"

        def new_primary() -> Region:
            assert chosen is not None, "drain chooses the new primary"
            return chosen

        async def promote() -> str:
            new = new_primary()
            async with connect(new.cluster, "postgres") as conn:
                ok = await conn.fetchval("SELECT pg_promote(true, 30)")
            if not ok:
                raise RuntimeError(f"pg_promote failed on {new.name}")
            new.role = "primary"
            old.role = "fenced"
            return f"{new.name} promoted"

        async def fence() -> str:
            new = new_primary()
            await asyncio.to_thread(old.cluster.fence, new.cluster)
            return f"{old.name} fenced: it can only start as a standby of {new.name}"

        async def reroute() -> str:
            new = new_primary()
            others = [r for r in self.regions.values() if r.role == "standby"]
            for region in others:
                await asyncio.to_thread(region.cluster.follow, new.cluster)
                await _reload(region.cluster)
                region.health = Health()
            streaming = await self.wait_streaming(new, [r.name for r in others])
            await self.set_sync_standbys(new, streaming)
            warm = new.engine.running  # it started itself once promoted
            if warm:
                await asyncio.to_thread(new.engine.wait_ready)
            else:
                await asyncio.to_thread(new.engine.start)
            self.proxy.point_to("127.0.0.1", new.engine.port)
            self.proxy.resume()
            degraded = "" if streaming else " (no standby streams yet: commits are not synchronous)"
            engine = "its warm engine" if warm else "its engine, started now"
            return f"traffic → {new.name} ({engine}); synchronous standbys {streaming}{degraded}"

        await phase("stop_ingestion", stop_ingestion)
        await phase("drain", drain)
        await phase("promote", promote)
        await phase("fence", fence)
        await phase("reroute", reroute)
        new = new_primary()
        verified = await phase("verify", lambda: self._verify(new))
        rto = round(time.monotonic() - t0, 3)
        report = {
            "event": "failover",
            "reason": reason,
            "old_primary": old.name,
            "new_primary": new.name,
            "started_at": started_at.isoformat(),
            "seconds": rto,
            "phases": [p.model_dump() for p in phases],
            "verified": verified,
        }
        await self._record(new, old.name, reason, started_at, phases)
        self.failovers.append(report)
        self.save_state()
        return report

    async def _verify(self, new: Region) -> str:
        """The outbox drains, the ledger verifies (no fork), the regions agree on counts."""
        # Drained: everything committed before the failover (the events in flight from the
        # old primary included) has been published from the new one. Traffic goes on
        # meanwhile, so "the outbox is empty" is not the test.
        async with connect(new.cluster) as conn:
            target = await conn.fetchval("SELECT COALESCE(max(id), 0) FROM outbox")
            deadline = time.monotonic() + 30
            while (left := await conn.fetchval(_UNPUBLISHED_UP_TO, target)) > 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"outbox not drained: {left} events up to {target} left")
                await asyncio.sleep(0.1)
        counts = await _counts(new.cluster)
        ledger = await asyncio.to_thread(ledger_verify, new.cluster, new.engine.env)
        if not ledger.get("valid"):
            raise RuntimeError(f"ledger invalid after failover: {ledger}")
        for region in self.standbys():
            await _wait_caught_up(region.cluster, counts["lsn"], wait_s=30)
            theirs = await _counts(region.cluster)
            if theirs["payments"] < counts["payments"] or theirs["ledger"] < counts["ledger"]:
                raise RuntimeError(f"{region.name} is missing rows: {theirs} < {counts}")
        return (
            f"outbox drained to {target}; ledger valid ({ledger.get('entries')} entries);"
            " standbys hold"
            f" the {counts['payments']} payments and {counts['ledger']} ledger entries"
        )

    async def _record(
        self,
        new: Region,
        old_name: str,
        reason: str,
        started_at: datetime,
        phases: list[PhaseTiming],
    ) -> None:
        db = Database(new.cluster.url(), pool_size=1)
        now = datetime.now(UTC)
        try:
            async with db.transaction() as conn:
                events = [
                    FailoverStarted(old_primary=old_name, reason=reason, started_at=started_at),
                    FailoverCompleted(
                        old_primary=old_name,
                        new_primary=new.name,
                        phases=tuple(phases),
                        completed_at=now,
                    ),
                ]
                await conn.exec_driver_sql(
                    "INSERT INTO dr_failovers (old_primary, new_primary, reason, started_at,"
                    " completed_at, phases) VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                    (
                        old_name,
                        new.name,
                        reason,
                        started_at,
                        now,
                        json.dumps([p.model_dump() for p in phases]),
                    ),
                )
                await append_to_outbox(
                    conn, [Envelope.wrap(e, partition_key="dr", occurred_at=now) for e in events]
                )
        finally:
            await db.close()


async def _reload(cluster: Cluster) -> None:
    async with connect(cluster, "postgres") as conn:
        await conn.execute("SELECT pg_reload_conf()")


async def _received_lsn(cluster: Cluster) -> int:
    async with connect(cluster, "postgres") as conn:
        lsn = await conn.fetchval(
            "SELECT COALESCE(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) - '0/0'::pg_lsn"
        )
        return int(lsn or 0)


async def _wait_replayed(cluster: Cluster, wait_s: float) -> None:
    async with connect(cluster, "postgres") as conn:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            done = await conn.fetchval(
                "SELECT pg_last_wal_receive_lsn() IS NULL"
                " OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()"
            )
            if done:
                return
            await asyncio.sleep(0.05)


async def _counts(cluster: Cluster) -> dict[str, int]:
    async with connect(cluster, "upi") as conn:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM payments) AS payments,"
            " (SELECT count(*) FROM ledger_entries) AS ledger,"
            " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() - '0/0'::pg_lsn"
            " ELSE pg_current_wal_lsn() - '0/0'::pg_lsn END AS lsn"
        )
        return {k: int(row[k]) for k in ("payments", "ledger", "lsn")}


async def _wait_caught_up(cluster: Cluster, lsn: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while (await _counts(cluster))["lsn"] < lsn:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cluster.name} did not replay up to the new primary")
        await asyncio.sleep(0.1)


def switch_debits(
    cluster: Cluster, base_env: dict[str, str], business_dates: Iterable[date]
) -> list[dict[str, Any]]:
    """The debits the switch shows on these IST dates, as its settlement data has them
    (``upi-engine settlement switch-data``: asked through the switch port, whether the
    switch is the in-process mock or at ``UPI_NPCI_URL``; this context reads none of its
    tables). Each once, by txn id."""
    env = {**base_env, "UPI_DATABASE_URL": cluster.url(), "UPI_LOG_LEVEL": "WARNING"}
    found: dict[str, dict[str, Any]] = {}
    for day in sorted(set(business_dates)):
        done = subprocess.run(
            [UPI_ENGINE, "settlement", "switch-data", "--business-date", day.isoformat()],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"switch-data {day}: {done.stderr.strip()[-500:]}")
        for row in json.loads(done.stdout)["rows"]:
            if row["debited"]:
                found[row["txn_id"]] = row
    return list(found.values())


def ledger_verify(cluster: Cluster, base_env: dict[str, str]) -> dict[str, Any]:
    """``upi-engine ledger verify --full --json`` against the cluster (the compliance
    context's own check; this context does not import it)."""
    env = {**base_env, "UPI_DATABASE_URL": cluster.url(), "UPI_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [UPI_ENGINE, "ledger", "verify", "--full", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return {"valid": False, "error": done.stderr.strip()[-500:]}
    return result

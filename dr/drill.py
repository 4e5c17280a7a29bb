"""DR drills (SPEC §8): build the regions on this machine, drive payments through the
proxy the whole time, break a region with SIGKILL, let the orchestrator act, and measure.

Scenarios:

``primary-loss``
    the primary region's PostgreSQL is SIGKILLed; the orchestrator fails over.
``standby-loss``
    a standby's PostgreSQL is SIGKILLed; the primary stops counting on it, it is rebuilt
    from the primary and streams again.
``failback``
    a primary loss, then the old region is rebuilt as a standby of the new primary and
    traffic is switched back to it (a planned switchover: nothing is lost).

Measures (the JSON of SPEC §8):

* ``accepted_payments``: payments the drill's merchant got a 202 for;
* ``final_payments``: of those, how many reached a final status on the final primary;
* ``lost_payments``: acknowledged, then absent from the final primary;
* ``duplicate_debits``: payments whose payer the switch debited more than once (every
  drill payment has its own payer, so any second debit of that payer is a duplicate), plus
  idempotency keys that made more than one payment;
* ``rto_seconds``: from the SIGKILL to the first payment acknowledged that was sent after
  it: how long merchants could not take payments;
* ``rpo_seconds``: the span of acknowledged payments lost (0 when none is): with quorum
  commit a 202 means a standby has the payment;
* ``ledger_valid``: ``upi-engine ledger verify --full`` on the final primary;
* ``phases``: each orchestrator phase with its duration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from core.clock import business_date
from core.processes import UPI_ENGINE, EngineProcess, free_port
from dr.cluster import Cluster, PgBinaries
from dr.orchestrator import (
    Orchestrator,
    Region,
    connect,
    ledger_verify,
    probe,
    switch_debits,
)
from dr.proxy import RoutingProxy

__all__ = ["SCENARIOS", "DrillConfig", "run_drill"]

SCENARIOS = ("primary-loss", "standby-loss", "failback", "primary-freeze")
FINAL = {"SUCCESS", "FAILED", "BLOCKED", "REVERSED"}


@dataclass
class DrillConfig:
    scenario: str = "primary-loss"
    rate: float = 20.0  # payments per second, the whole drill
    duration_s: float = 30.0
    kill_after_s: float = 8.0
    regions: tuple[str, ...] = ("mumbai", "hyderabad", "chennai")
    base_dir: Path | None = None
    keep: bool = False
    pg_bin: str | None = None
    settle_timeout_s: float = 60.0


def drill_payer(order_id: str) -> str:
    """The payer of the drill's payment ``drill-<n>`` (its key and its order id): each has
    its own, so that a payer debited twice is a duplicate."""
    return f"drill.payer{order_id.removeprefix('drill-')}@okhdfc"


@dataclass
class Load:
    """Payments through the proxy at a steady rate; each retried with its own key until it
    is acknowledged (a merchant's correct behaviour)."""

    url: str
    api_key: str
    rate: float
    acked: dict[str, tuple[str, float, float]] = field(
        default_factory=dict
    )  # key -> txn, sent, acked
    unacked: set[str] = field(default_factory=set)
    errors: int = 0
    stopping: bool = False

    async def one(self, client: httpx.AsyncClient, n: int) -> None:
        key = f"drill-{n}"
        body = {
            "payer_vpa": drill_payer(key),
            "amount_paise": 100 + (n * 7919) % 4_900,
            "merchant_order_id": f"drill-{n}",
        }
        headers = {"Authorization": f"Bearer {self.api_key}", "Idempotency-Key": key}
        sent = time.monotonic()
        self.unacked.add(key)
        while True:
            try:
                r = await client.post("/v1/payments", json=body, headers=headers, timeout=5)
                if r.status_code == 202:
                    self.acked[key] = (r.json()["transaction_id"], sent, time.monotonic())
                    self.unacked.discard(key)
                    return
                if r.status_code < 500 and r.status_code != 429:
                    raise RuntimeError(f"payment {key} refused: {r.status_code} {r.text}")
            except httpx.HTTPError:
                pass
            self.errors += 1
            if self.stopping and time.monotonic() - sent > 60:
                return
            await asyncio.sleep(0.2)

    async def run(self, seconds: float) -> None:
        tasks: list[asyncio.Task[None]] = []
        async with httpx.AsyncClient(base_url=self.url) as client:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < seconds:
                tasks.append(asyncio.create_task(self.one(client, n)))
                n += 1
                next_at = started + n / self.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.stopping = True
            await asyncio.gather(*tasks)


class Drill:
    def __init__(self, cfg: DrillConfig, report: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.say = report
        self.base = cfg.base_dir or Path(tempfile.mkdtemp(prefix="udr", dir="/tmp"))
        self.writable_max = 0
        self.bins = PgBinaries.locate(cfg.pg_bin or os.environ.get("UPI_DR_PG_BIN"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UPI_")}
        # The regions share one master key (one ledger, one set of data keys); it stays in
        # the drill's directory (mode 0600) so that kept regions can be inspected.
        key_file = self.base / "master.key"
        key_file.touch(mode=0o600)
        key_file.write_text(base64.b64encode(os.urandom(32)).decode())
        self.env.update(
            {
                "UPI_MASTER_KEY_FILE": str(key_file),
                "UPI_LOG_LEVEL": "WARNING",
                "UPI_NPCI_MOCK_LATENCY_SCALE": "0.1",
                # NPCI's timetable five times as fast (unless the operator set one): a
                # payment in flight at the kill is deemed, and its first check-status (90 s
                # after the pay leg at NPCI's pace) comes within the settle time.
                "UPI_NPCI_TIME_SCALE": os.environ.get("UPI_NPCI_TIME_SCALE", "0.2"),
                # Each region's HTTP processes as the operator asks (auto: one per CPU).
                "UPI_GATEWAY_PROCESSES": os.environ.get("UPI_GATEWAY_PROCESSES", "auto"),
                "UPI_PAYER_DAILY_MAX_COUNT": "100000",
                "UPI_MERCHANT_RATE_PER_S": "1000",
                "UPI_MERCHANT_RATE_BURST": "1000",
                # Nobody answers a fraud step-up in a drill: let those payments expire soon.
                "UPI_FRAUD_VERIFICATION_TTL_S": "10",
            }
        )
        self.regions: list[Region] = []
        self.proxy = RoutingProxy()
        self.started_on = business_date(datetime.now(UTC))  # IST: the switch's dates

    def region_env(self, cluster: Cluster) -> dict[str, str]:
        return {
            **self.env,
            "UPI_DATABASE_URL": cluster.url(),
            "UPI_DATA_DIR": str(cluster.data_dir),
            # Every region's engine is warm: a standby's waits, loaded, for its promotion.
            "UPI_WAIT_FOR_PRIMARY": "true",
        }

    async def build(self) -> Orchestrator:
        names = self.cfg.regions
        for name in names:
            cluster = Cluster(name, self.base / name, free_port(), self.bins)
            engine = EngineProcess(free_port(), {}, self.base / f"{name}-engine.log")
            engine.env = self.region_env(cluster)
            self.regions.append(Region(name, cluster, engine))
        primary, *standbys = self.regions
        self.say(f"initdb {primary.name}")
        await asyncio.to_thread(primary.cluster.init_primary)
        await asyncio.to_thread(primary.cluster.start)
        async with connect(primary.cluster, "postgres") as conn:
            await conn.execute("CREATE DATABASE upi")
        primary.role = "primary"
        for region in standbys:
            self.say(f"pg_basebackup {region.name} from {primary.name}")
            await asyncio.to_thread(region.cluster.base_backup_from, primary.cluster)
            await asyncio.to_thread(region.cluster.start)
        await self.proxy.start()
        # Health checks every 0.2 s: a primary is declared lost after 3 failed in a row.
        orchestrator = Orchestrator(
            self.regions, self.proxy, self.base / "dr-state.json", interval_s=0.2, on_phase=self.say
        )
        await orchestrator.wait_streaming(primary, [r.name for r in standbys])
        await orchestrator.set_sync_standbys(primary, [r.name for r in standbys])
        self.say(f"engine for {primary.name}; warm engines for {[r.name for r in standbys]}")
        for region in standbys:
            await asyncio.to_thread(region.engine.spawn)
        await asyncio.to_thread(primary.engine.start)
        self.proxy.point_to("127.0.0.1", primary.engine.port)
        orchestrator.save_state()
        return orchestrator

    def merchant(self, cluster: Cluster) -> dict[str, Any]:
        done = subprocess.run(
            [
                UPI_ENGINE,
                "merchant",
                "create",
                "--name",
                "DR drill",
                "--vpa",
                "drill@okicici",
                "--json",
            ],
            env=self.region_env(cluster),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        created: dict[str, Any] = json.loads(done.stdout)
        return created

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        orchestrator = await self.build()
        primary = orchestrator.primary
        merchant = self.merchant(primary.cluster)
        load = Load(self.proxy.url, merchant["api_key"], cfg.rate)
        watcher = asyncio.create_task(orchestrator.run())
        driving = asyncio.create_task(load.run(cfg.duration_s))

        async def ticker() -> None:
            while not driving.done():
                self.say(
                    f"{len(load.acked)} payments acknowledged, {load.errors} retries;"
                    f" primary {orchestrator.primary.name}"
                )
                await asyncio.sleep(1)

        ticking = asyncio.create_task(ticker())
        done_probing = asyncio.Event()
        writable = asyncio.create_task(self.count_writable(orchestrator, done_probing))
        await asyncio.sleep(cfg.kill_after_s)
        killed_at = time.monotonic()
        old_primary = primary.name
        match cfg.scenario:
            case "primary-loss" | "failback":
                self.say(f"SIGKILL {primary.name}'s PostgreSQL")
                await asyncio.to_thread(primary.cluster.kill)
            case "primary-freeze":
                self.say(f"SIGSTOP {primary.name}'s PostgreSQL (frozen, not dead)")
                await asyncio.to_thread(primary.cluster.freeze)
            case "standby-loss":
                target = orchestrator.standbys()[0]
                self.say(f"SIGKILL {target.name}'s PostgreSQL (a standby)")
                await asyncio.to_thread(target.cluster.kill)
            case _:
                raise ValueError(f"unknown scenario {cfg.scenario}")
        if cfg.scenario == "primary-freeze":
            await orchestrator.wait_for(lambda: orchestrator.primary.name != old_primary, 60)
            self.say(f"SIGCONT {old_primary}'s PostgreSQL: it must come back fenced")
            await asyncio.to_thread(orchestrator.regions[old_primary].cluster.thaw)
        if cfg.scenario == "failback":
            await orchestrator.wait_for(lambda: orchestrator.primary.name != old_primary, 60)
            old = orchestrator.regions[old_primary]
            self.say(f"rebuild {old.name} as a standby of {orchestrator.primary.name}")
            async with orchestrator.busy:
                await orchestrator.rejoin(old)
                await orchestrator.switchover(old, reason="failback to the rebuilt region")
        await driving
        ticking.cancel()
        # Stopped by an event, not by cancelling: on Python 3.11 asyncio.wait_for (inside
        # asyncpg.connect) can swallow a cancellation that lands as it completes, and a
        # probe loop that missed it ran for ever (a drill hung in the suite).
        done_probing.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writable, 10)
        orchestrator.stop()
        await watcher
        final = orchestrator.primary
        self.say("waiting for every acknowledged payment to be final")
        result = await self.measure(final, load, killed_at)
        result.update(
            {
                "scenario": cfg.scenario,
                "old_primary": old_primary,
                "new_primary": final.name,
                "rate": cfg.rate,
                "data_dir": str(self.base) if cfg.keep else None,
                "duration_seconds": cfg.duration_s,
                "phases": [p for f in orchestrator.failovers for p in f.get("phases", [])],
                "events": [
                    {k: v for k, v in f.items() if k != "phases"} for f in orchestrator.failovers
                ],
            }
        )
        result["writable_primaries_max"] = self.writable_max
        result["ok"] = (
            result["writable_primaries_max"] <= 1
            and result["lost_payments"] == 0
            and result["duplicate_debits"] == 0
            and result["ledger_valid"]
            and result["final_payments"] == result["accepted_payments"]
        )
        return result

    async def count_writable(self, orchestrator: Orchestrator, done: asyncio.Event) -> None:
        """Every region is probed every 100 ms; a region counts as a writable primary for
        150 ms after it answered as one (a frozen one stops answering). The most counted
        at once is ``writable_primaries_max``: 1, or it was a split brain."""
        answered: dict[str, float] = {}

        async def watch(region: Region) -> None:
            while not done.is_set():
                began = time.monotonic()
                if await probe(region.cluster, 0.5) == "primary":
                    now = time.monotonic()
                    answered[region.name] = now
                    at_once = sum(1 for t in answered.values() if now - t < 0.15)
                    self.writable_max = max(self.writable_max, at_once)
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - began)))

        async with asyncio.TaskGroup() as group:
            for region in list(orchestrator.regions.values()):
                group.create_task(watch(region))

    async def measure(self, final: Region, load: Load, killed_at: float) -> dict[str, Any]:
        acked = load.acked
        txns = {txn for txn, _, _ in acked.values()}
        async with connect(final.cluster) as conn:
            deadline = time.monotonic() + self.cfg.settle_timeout_s
            while True:
                rows = await conn.fetch(
                    "SELECT transaction_id, status, merchant_order_id FROM payments"
                    " WHERE transaction_id = ANY($1::text[])",
                    list(txns),
                )
                final_count = sum(1 for r in rows if r["status"] in FINAL)
                if final_count == len(rows) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            present = {r["transaction_id"] for r in rows}
            unfinished = [
                f"{r['transaction_id']} {r['status']}" for r in rows if r["status"] not in FINAL
            ]
            # The payer is sealed in the row; the drill knows whom it sent each order for.
            payers = {drill_payer(r["merchant_order_id"]) for r in rows}
            keys = await conn.fetchval(
                "SELECT count(*) FROM (SELECT merchant_order_id FROM payments"
                " WHERE merchant_order_id LIKE 'drill-%' GROUP BY merchant_order_id"
                " HAVING count(*) > 1) AS twice"
            )
        # The switch's own account of its debits, through its settlement data for the dates
        # the drill ran on: a payer debited twice is a duplicate (each has its own payer).
        shown = await asyncio.to_thread(
            switch_debits,
            final.cluster,
            self.env,
            {self.started_on, business_date(datetime.now(UTC))},
        )
        per_payer = Counter(d["payer_vpa"] for d in shown if d["payer_vpa"] in payers)
        debits = [payer for payer, n in per_payer.items() if n > 1]
        lost = [(k, v) for k, v in acked.items() if v[0] not in present]
        after = [a for _, s, a in acked.values() if s >= killed_at]
        rto = round(min(after) - killed_at, 3) if after else None
        rpo = round(max(0.0, killed_at - min(a for _, (_, _, a) in lost)), 3) if lost else 0.0
        ledger = await asyncio.to_thread(ledger_verify, final.cluster, self.env)
        return {
            "accepted_payments": len(acked),
            "final_payments": final_count,
            "lost_payments": len(lost),
            "duplicate_debits": len(debits) + int(keys or 0),
            "unacknowledged_payments": len(load.unacked),
            "unfinished": unfinished[:20],
            "client_retries": load.errors,
            "rto_seconds": rto,
            "rpo_seconds": rpo,
            "ledger_valid": bool(ledger.get("valid")),
            "ledger_entries": ledger.get("entries"),
        }

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.proxy.stop()
        for region in self.regions:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(region.engine.stop)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(region.cluster.stop)
        if not self.cfg.keep:
            shutil.rmtree(self.base, ignore_errors=True)


async def run_drill(
    cfg: DrillConfig, report: Callable[[str], None] | None = None
) -> dict[str, Any]:
    if cfg.scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}")
    random.seed(0)
    drill = Drill(cfg, report or (lambda _: None))
    try:
        return await drill.run()
    finally:
        await drill.close()

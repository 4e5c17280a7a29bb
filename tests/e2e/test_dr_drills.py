"""DR drills, shortened for CI: each builds three regions (PostgreSQL with streaming
replication and quorum commit), drives payments through the proxy, SIGKILLs a region's
PostgreSQL and checks the invariants. Run through the real ``upi-engine dr drill``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path

import asyncpg
import psutil
import pytest

from dr.cluster import Cluster, PgBinaries
from tests.e2e.harness import base_env, cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT = ("--rate", "10", "--duration", "12", "--kill-after", "4")


def drill(scenario: str, *extra: str, processes: str = "1") -> dict:
    # One HTTP process per region's engine (10 payments a second need no more), except
    # where a test asks for the default (the drill must stop extra gateways too).
    env = base_env(UPI_GATEWAY_PROCESSES=processes)
    done = cli(env, "dr", "drill", "--scenario", scenario, *SHORT, *extra, "--json", timeout=600)
    # A crash's traceback is long: show where in the engine it went (its frames name our
    # packages) and how it ended.
    ours = [line for line in done.stderr.splitlines() if "/work/" in line or "dr/" in line]
    assert done.stdout, "\n".join([*ours[-40:], done.stderr[-1500:]])
    result = json.loads(done.stdout)
    assert done.returncode == (0 if result["ok"] else 1)
    return result


def holds_every_invariant(result: dict) -> None:
    assert result["accepted_payments"] >= 100
    assert result["final_payments"] == result["accepted_payments"], result["unfinished"]
    assert result["lost_payments"] == 0 and result["rpo_seconds"] == 0
    assert result["duplicate_debits"] == 0
    assert result["ledger_valid"] is True and result["ledger_entries"] > 0
    assert result["rto_seconds"] is not None and result["rto_seconds"] >= 0
    assert result["ok"] is True


def test_primary_loss_fails_over_and_the_old_primary_comes_back_fenced():
    result = drill("primary-loss", "--keep", processes="auto")
    holds_every_invariant(result)
    assert (result["old_primary"], result["new_primary"]) == ("mumbai", "hyderabad")
    names = [p["name"] for p in result["phases"]]
    assert names == ["stop_ingestion", "drain", "promote", "fence", "reroute", "verify"]
    assert all(p["seconds"] >= 0 and p["ok"] for p in result["phases"])
    # The standby's engine was running, loaded, before the failover: it only had to notice
    # the promotion (a cold start was most of the RTO before).
    [reroute] = [p for p in result["phases"] if p["name"] == "reroute"]
    assert "its warm engine" in reroute["detail"], reroute
    base = Path(result["data_dir"])
    # Every region's engine went with the drill: the standby still waiting for a promotion,
    # and its extra gateway processes, included.
    deadline = time.monotonic() + 10
    while (left := _engines_of(base)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "an engine outlived the drill"
    try:
        asyncio.run(old_primary_cannot_write_or_fork(base))
    finally:
        for name in ("mumbai", "hyderabad", "chennai"):
            Cluster(name, base / name, 0, PgBinaries.locate()).stop()
        shutil.rmtree(base, ignore_errors=True)


async def old_primary_cannot_write_or_fork(base: Path) -> None:
    state = json.loads((base / "dr-state.json").read_text())
    assert state["primary"] == "hyderabad" and state["regions"]["mumbai"]["role"] == "fenced"
    bins = PgBinaries.locate()
    old = Cluster("mumbai", base / "mumbai", state["regions"]["mumbai"]["port"], bins)
    new = Cluster("hyderabad", base / "hyderabad", state["regions"]["hyderabad"]["port"], bins)
    assert (old.data_dir / "FENCED").exists()
    new.start()
    # The new primary's synchronous standby: without it its commits would wait.
    Cluster("chennai", base / "chennai", state["regions"]["chennai"]["port"], bins).start()
    old.start()  # the old primary comes back, as if its machine rebooted
    conn = await asyncpg.connect(host="127.0.0.1", port=old.port, user="postgres", database="upi")
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("DELETE FROM ledger_entries WHERE height = 0")
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute(
                "INSERT INTO outbox (event_id, topic, partition_key, event_type, envelope)"
                " VALUES (gen_random_uuid(), 'dr', 'k', 'X', '\\x00')"
            )
    finally:
        await conn.close()
    primary = await asyncpg.connect(
        host="127.0.0.1", port=new.port, user="postgres", database="upi"
    )
    try:
        assert await primary.fetchval("SELECT pg_is_in_recovery()") is False
        kinds = {
            r["event_type"]
            for r in await primary.fetch(
                "SELECT event_type FROM ledger_entries WHERE event_type LIKE 'Failover%'"
            )
        }
        assert kinds == {"FailoverStarted", "FailoverCompleted"}
        failover = await primary.fetchrow("SELECT * FROM dr_failovers")
        assert (failover["old_primary"], failover["new_primary"]) == ("mumbai", "hyderabad")
    finally:
        await primary.close()
    # The new primary's ledger still verifies: no fork, whatever the old one holds.
    env = base_env(
        UPI_DATABASE_URL=new.url(),
        UPI_MASTER_KEY_FILE=str(base / "master.key"),
        UPI_DR_STATE_FILE=str(base / "dr-state.json"),
    )
    verify = cli(env, "ledger", "verify", "--full", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["valid"] is True, verify.stderr
    status = cli(env, "dr", "status", "--json")
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert seen["database_role"] == "primary"
    assert seen["last_failover"]["new_primary"] == "hyderabad"
    assert seen["orchestrator"]["regions"]["mumbai"]["role"] == "fenced"


def test_standby_loss_is_rebuilt_while_payments_go_on():
    result = drill("standby-loss")
    holds_every_invariant(result)
    assert result["old_primary"] == result["new_primary"] == "mumbai"
    assert [p["name"] for p in result["phases"]] == ["repoint", "rebuild", "rejoin"]


def test_failback_returns_to_the_rebuilt_region():
    result = drill("failback")
    holds_every_invariant(result)
    assert result["old_primary"] == result["new_primary"] == "mumbai"
    moves = [(e["old_primary"], e["new_primary"]) for e in result["events"]]
    assert moves == [("mumbai", "hyderabad"), ("hyderabad", "mumbai")]


def test_drill_refuses_an_unknown_scenario():
    done = cli(base_env(), "dr", "drill", "--scenario", "meteor")
    assert done.returncode == 2 and "primary-loss" in done.stderr


def test_primary_freeze_fails_over_and_the_thawed_primary_is_fenced():
    # A gray failure: the primary's PostgreSQL is SIGSTOPped, not killed. The orchestrator
    # fails over; after SIGCONT the old primary must not be writable: probing every region
    # every 100 ms for the whole drill never finds two writable primaries.
    result = drill("primary-freeze", "--keep")
    try:
        holds_every_invariant(result)
        assert result["writable_primaries_max"] == 1
        assert result["new_primary"] != result["old_primary"]
        base = Path(result["data_dir"])
        assert (base / result["old_primary"] / "FENCED").exists()
    finally:
        shutil.rmtree(result["data_dir"], ignore_errors=True)


def _engines_of(base: Path) -> list[int]:
    """The ``serve`` processes whose data dir is one of the drill's regions."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "serve" not in (proc.info["cmdline"] or []):
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("UPI_DATA_DIR", "").startswith(str(base)):
                found.append(proc.pid)
    return found

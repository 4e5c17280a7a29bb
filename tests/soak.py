"""The soak (issue 14; not run in CI): ``upi-engine load`` for a long while, a fault every
``--fault-every`` seconds taken in turn from the fault tests, then the invariant checker.

The engine runs in distributed mode (``serve`` with every role, on the Kafka bus) against
a real PostgreSQL and a Tansu broker, each behind the fault proxy (``tests/faultproxy.py``):

1. PostgreSQL SIGKILLed, started again 3 s later (its pooled connections all break);
2. Tansu SIGKILLed and started again empty on the same port (the broker lost its log);
3. 200 ms more on every database call, for 10 s;
4. every database connection reset, mid-transaction;
5. the database blackholed for 10 s;
6. the broker blackholed for 10 s.

Run: ``scripts/soak [--rate 200] [--duration 600] [--fault-every 30]``; it prints one JSON
object (record it in docs/reliability.md) and exits 1 if an invariant failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import asyncpg
import httpx

from tests.e2e.harness import NPCI_FIVE_TIMES_FASTER, UPI_ENGINE, Serve, base_env, create_merchant
from tests.faultproxy import FaultProxy
from tests.invariants import check_invariants
from tests.support import Tansu, embedded_postgres_server, free_port, unique_name


def _kill_postgres(server: Any) -> None:
    pgdata = Path(server.pgdata)
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)
    time.sleep(3)
    with server._lock:  # the wheel's own start (crash recovery), as an operator would
        server.ensure_postgres_running()


def main() -> int:
    # SIGTERM runs the finally blocks too: the engine, the broker and the database stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--fault-every", type=float, default=30)
    args = parser.parse_args()

    with embedded_postgres_server() as (pg, url_template):
        socket_dir = Path(pg.get_postmaster_info().socket_dir)
        name = unique_name("soak")
        asyncio.run(_create_database(url_template, name))
        broker_port = free_port()
        tansu = Tansu(advertised_port=broker_port)
        with (
            FaultProxy(socket_dir / ".s.PGSQL.5432") as db_proxy,
            FaultProxy(("127.0.0.1", tansu.port), port=broker_port) as bus_proxy,
        ):
            tansu.start()
            env = base_env(
                UPI_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{db_proxy.port}/{name}",
                UPI_BUS="kafka",
                UPI_KAFKA_BOOTSTRAP=f"127.0.0.1:{broker_port}",
                UPI_KAFKA_IDEMPOTENCE="false",
                UPI_KAFKA_TOPIC_PREFIX=name,
                UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
                UPI_DATA_DIR="/tmp/unused-data-dir",
                UPI_LOG_LEVEL="WARNING",
                UPI_NPCI_MOCK_LATENCY_SCALE="1",
                UPI_MERCHANT_RATE_PER_S="100000",
                UPI_MERCHANT_RATE_BURST="100000",
                **NPCI_FIVE_TIMES_FASTER,
            )
            server = Serve(env).start()
            try:
                merchant = create_merchant(env)
                faults = [
                    ("postgres_killed", lambda: _kill_postgres(pg)),
                    ("broker_restarted_empty", lambda: (tansu.kill(), tansu.start())),
                    ("db_latency_200ms_10s", lambda: _for(10, db_proxy.latency, 0.2)),
                    ("db_connections_reset", db_proxy.reset),
                    ("db_blackholed_10s", lambda: db_proxy.blackhole(10)),
                    ("broker_blackholed_10s", lambda: bus_proxy.blackhole(10)),
                ]
                injected: list[dict[str, Any]] = []
                stop = threading.Event()
                injector = threading.Thread(
                    target=_inject,
                    args=(faults, args.fault_every, stop, injected, server.url),
                    daemon=True,
                )
                injector.start()
                command = [UPI_ENGINE, "load", "--url", server.url]
                command += ["--api-key", merchant["api_key"], "--rate", str(args.rate)]
                load = subprocess.run(
                    [*command, "--duration", str(args.duration), "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                stop.set()
                injector.join(60)
                db_proxy.clear()
                bus_proxy.clear()
                summary = json.loads(load.stdout) if load.stdout else {"error": load.stderr}
                result: dict[str, Any] = {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                    "rate": args.rate,
                    "duration_s": args.duration,
                    "load": summary,
                    "faults": injected,
                }
                try:
                    checked = check_invariants(env, None, timeout=600)
                    result["invariants"] = "hold"
                    result["payments"] = checked.payments
                    result["by_status"] = checked.by_status
                    result["lost"] = summary.get("accepted", 0) - checked.payments
                except AssertionError as exc:
                    result["invariants"] = f"FAILED: {exc}"
                print(json.dumps(result, indent=2))
                ok = result["invariants"] == "hold" and result.get("lost") == 0
                return 0 if ok else 1
            finally:
                server.stop()
                tansu.stop()


def _for(seconds: float, set_latency: Any, value: float) -> None:
    set_latency(value)
    time.sleep(seconds)
    set_latency(0.0)


def _inject(
    faults: list[tuple[str, Any]],
    every: float,
    stop: threading.Event,
    injected: list[dict[str, Any]],
    url: str,
) -> None:
    turn = 0
    started = time.monotonic()
    while not stop.wait(every):
        name, inject = faults[turn % len(faults)]
        turn += 1
        began = time.monotonic()
        inject()
        back = _ready_again(url, began)
        injected.append({"fault": name, "at_s": round(began - started, 1), "ready_after_s": back})
        print(f"soak: {name}: ready again after {back} s", file=sys.stderr)


def _ready_again(url: str, since: float, timeout: float = 120) -> float | None:
    while time.monotonic() - since < timeout:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return round(time.monotonic() - since, 2)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return None


async def _create_database(url_template: str, name: str) -> None:
    socket = url_template.split("host=", 1)[1]
    conn = await asyncpg.connect(host=unquote(socket), user="postgres", database="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())

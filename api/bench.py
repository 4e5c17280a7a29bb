"""``upi-engine bench`` (SPEC §9): the whole engine under load, against baselines measured
in the same run on the same machine.

The run:

1. a scratch data dir with its own embedded PostgreSQL, and ``upi-engine serve`` on a free
   port (the in-process bus, or Kafka at ``UPI_KAFKA_BOOTSTRAP`` with ``--bus kafka``);
   the per-merchant rate limit is lifted, everything else is as shipped, the mock NPCI
   switch's latencies and declines included;
2. a merchant, then ``payments`` realistic payments (``api.loadgen``), ``concurrency`` in
   flight: ``initiation_*`` is the 202's round trip as the client saw it,
   ``payments_per_second`` the accepted payments over the time to send them;
3. waiting until every payment is final or waits for its payer's verification (a fraud
   step-up), and every event is in the ledger: ``final_*`` is created → final status as the
   gateway recorded them, ``fraud_*`` initiation → fraud decision (queueing included, from
   the outbox), ``ledger_entries_per_second`` the ledger's entries over the time from the
   first payment sent until the ledger held every event;
4. the baselines: the same requests, same concurrency, against a bare FastAPI endpoint
   that only validates the body (the floor of the HTTP stack), and a bare PostgreSQL insert
   loop, one committed row per payment on as many connections (the floor of a durable
   write), with the ratios of the engine to them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI

from api.loadgen import drive_concurrently, percentile, traffic
from api.schemas import CreatePaymentRequest
from core.embedded import embedded_database_url, scratch_data_dir
from core.processes import UPI_ENGINE, EngineProcess, free_port
from core.storage import plain_url
from payments.domain import FINAL_STATUSES, PaymentStatus

__all__ = ["BenchError", "bare_app", "run_bench"]

_SETTLE_TIMEOUT_S = 300.0
_FINAL = sorted(status.value for status in FINAL_STATUSES)


class BenchError(Exception):
    """The run could not be completed (the message says why)."""


# The bare endpoint of the HTTP baseline: the same request model, nothing behind it.
bare_app = FastAPI()


@bare_app.post("/v1/payments", status_code=202)
async def _bare_payment(request: CreatePaymentRequest) -> dict[str, str]:
    return {"transaction_id": uuid.uuid4().hex, "status": "INITIATED"}


@bare_app.get("/readyz")
async def _bare_ready() -> dict[str, str]:
    return {"status": "ready"}


def _env(data_dir: Path, bus: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPI_")}
    env.update(
        {
            "UPI_DATA_DIR": str(data_dir),
            "UPI_LOG_LEVEL": "WARNING",
            "UPI_MERCHANT_RATE_PER_S": "1000000",
            "UPI_MERCHANT_RATE_BURST": "1000000",
        }
    )
    if bus == "kafka":
        bootstrap = os.environ.get("UPI_KAFKA_BOOTSTRAP")
        if not bootstrap:
            raise BenchError("--bus kafka needs UPI_KAFKA_BOOTSTRAP (the broker to use)")
        env.update(
            {
                "UPI_BUS": "kafka",
                "UPI_KAFKA_BOOTSTRAP": bootstrap,
                "UPI_KAFKA_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
                "UPI_KAFKA_IDEMPOTENCE": os.environ.get("UPI_KAFKA_IDEMPOTENCE", "true"),
            }
        )
    return env


_WORKER_ROLES = ("relay", "fraud", "switch", "ledger", "settlement")


def _servers(env: dict[str, str], data_dir: Path, processes: int) -> list[EngineProcess]:
    """One ``serve`` with every role, or the gateway in one and the workers (the relay with
    its in-process consumers) in another; the gateway first."""
    # They run in the scratch dir: a .env file where the bench was started (one naming a
    # real database, say) must not reach them.
    if processes == 1:
        return [EngineProcess(free_port(), env, data_dir / "serve.log", cwd=data_dir)]
    ports = free_port(), free_port()
    gateway = (UPI_ENGINE, "serve", "--port", str(ports[0]), "--role", "gateway")
    workers = [UPI_ENGINE, "serve", "--port", str(ports[1])]
    for role in _WORKER_ROLES:
        workers += ["--role", role]
    return [
        EngineProcess(ports[0], env, data_dir / "gateway.log", gateway, data_dir),
        EngineProcess(ports[1], env, data_dir / "workers.log", tuple(workers), data_dir),
    ]


def _merchant(env: dict[str, str], data_dir: Path) -> str:
    done = subprocess.run(
        [UPI_ENGINE, "merchant", "create", "--name", "bench", "--vpa", "bench@okicici", "--json"],
        env=env,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"merchant create failed: {done.stderr.strip() or done.stdout.strip()}")
    return str(json.loads(done.stdout)["api_key"])


async def _wait_settled(
    conn: asyncpg.Connection, payments: int, began: float, deadline: float
) -> float:
    """Waits until every payment is final or awaits verification and the ledger holds every
    event; returns when that happened (perf_counter)."""
    while True:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM payments WHERE status = ANY($1::text[])) AS settled,"
            " (SELECT count(*) FROM outbox) AS events,"
            " (SELECT count(*) FROM ledger_entries) AS entries",
            [*_FINAL, PaymentStatus.PENDING_VERIFICATION.value],
        )
        assert row is not None
        if row["settled"] >= payments and row["entries"] >= row["events"]:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(
                f"not settled after {deadline - began:.0f} s: {row['settled']} of {payments}"
                f" payments final, {row['entries']} of {row['events']} events in the ledger"
            )
        await asyncio.sleep(0.2)


async def _measured(conn: asyncpg.Connection) -> dict[str, Any]:
    final = [
        float(r[0])
        for r in await conn.fetch(
            "SELECT extract(epoch FROM completed_at - created_at) * 1000 FROM payments"
            " WHERE status = ANY($1::text[])",
            _FINAL,
        )
    ]
    fraud = [
        float(r[0])
        for r in await conn.fetch(
            "SELECT extract(epoch FROM d.created_at - i.created_at) * 1000"
            " FROM outbox i JOIN outbox d"
            " ON convert_from(d.envelope, 'UTF8')::jsonb ->> 'transaction_id'"
            "  = convert_from(i.envelope, 'UTF8')::jsonb ->> 'transaction_id'"
            " WHERE i.event_type = 'PaymentInitiated' AND d.event_type = 'FraudAssessed'"
        )
    ]
    statuses = {
        r["status"]: int(r["n"])
        for r in await conn.fetch("SELECT status, count(*) AS n FROM payments GROUP BY status")
    }
    entries = int(await conn.fetchval("SELECT count(*) FROM ledger_entries"))
    return {"final": final, "fraud": fraud, "statuses": statuses, "entries": entries}


async def _bare_inserts(conn_url: str, payments: int, concurrency: int) -> float:
    """Rows per second: one committed insert per payment, ``concurrency`` connections."""
    setup = await asyncpg.connect(conn_url)
    await setup.execute(
        "CREATE TABLE bench_bare (id bigserial PRIMARY KEY, body jsonb NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now())"
    )
    conns = [await asyncpg.connect(conn_url) for _ in range(concurrency)]
    shares = [range(i, payments, concurrency) for i in range(concurrency)]
    body = json.dumps({"payer_vpa": "user1@okhdfc", "amount_paise": 12_345})
    try:
        began = time.perf_counter()

        async def insert(conn: asyncpg.Connection, share: range) -> None:
            for _ in share:
                await conn.execute("INSERT INTO bench_bare (body) VALUES ($1::jsonb)", body)

        await asyncio.gather(*(insert(c, s) for c, s in zip(conns, shares, strict=True)))
        seconds = time.perf_counter() - began
    finally:
        for c in conns:
            await c.close()
        await setup.execute("DROP TABLE bench_bare")
        await setup.close()
    return payments / seconds


async def _bare_http(bodies: list[dict[str, Any]], concurrency: int, log: Path) -> dict[str, float]:
    port = free_port()
    command = (sys.executable, "-m", "uvicorn", "api.bench:bare_app", "--port", str(port))
    server = EngineProcess(
        port, dict(os.environ), log, (*command, "--log-level", "warning", "--no-access-log")
    )
    try:
        await asyncio.to_thread(server.start, 60)
        sent = await drive_concurrently(server.url, "bare", bodies, concurrency)
    finally:
        server.stop()
    latencies = list(sent.accepted.values())
    return {
        "requests_per_second": len(latencies) / sent.seconds,
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
    }


def _r(value: float, digits: int = 2) -> float:
    return round(value, digits)


async def run_bench(
    payments: int,
    concurrency: int,
    bus: str,
    *,
    processes: int = 1,
    seed: int = 20261125,
    on_phase: Callable[[str], None] = lambda phase: None,
    on_sent: Callable[[], None] | None = None,
) -> dict[str, Any]:
    bodies = list(itertools.islice(traffic(seed, f"bench-{uuid.uuid4().hex[:6]}"), payments))
    with scratch_data_dir("ub") as data_dir:
        env = _env(data_dir, bus)
        servers = _servers(env, data_dir, processes)
        engine = servers[0]  # the gateway
        on_phase("starting the engine")
        try:
            for server in servers:
                await asyncio.to_thread(server.start, 120)
            api_key = await asyncio.to_thread(_merchant, env, data_dir)
            on_phase("sending payments")
            sent = await drive_concurrently(
                engine.url, api_key, bodies, concurrency, on_sent=on_sent
            )
            if len(sent.accepted) != payments:
                raise BenchError(f"only {len(sent.accepted)} of {payments} accepted: {sent}")
            on_phase("waiting for final statuses and the ledger")
            # Joining the embedded server keeps it up after the engine stops, for the
            # insert baseline; the scratch dir's clean-up stops it.
            url = await asyncio.to_thread(embedded_database_url, data_dir)
            conn_url = plain_url(url)
            conn = await asyncpg.connect(conn_url)
            try:
                caught_up = await _wait_settled(
                    conn, payments, sent.started, sent.finished + _SETTLE_TIMEOUT_S
                )
                measured = await _measured(conn)
            finally:
                await conn.close()
        finally:
            for server in servers:
                server.stop()
        on_phase("measuring the baselines")
        bare_http = await _bare_http(bodies, concurrency, data_dir / "bare.log")
        bare_insert = await _bare_inserts(conn_url, payments, concurrency)
    initiation = list(sent.accepted.values())
    rate = payments / sent.seconds
    return {
        "payments": payments,
        "concurrency": concurrency,
        "bus": bus,
        "processes": processes,
        "seconds": _r(sent.seconds, 3),
        "payments_per_second": _r(rate, 1),
        "initiation_p50_ms": _r(percentile(initiation, 0.5)),
        "initiation_p99_ms": _r(percentile(initiation, 0.99)),
        "final_p50_ms": _r(percentile(measured["final"], 0.5)),
        "final_p99_ms": _r(percentile(measured["final"], 0.99)),
        # Payments completed end to end: all of them over the time until the last settled.
        "settled_per_second": _r(payments / (caught_up - sent.started), 1),
        "ledger_entries_per_second": _r(measured["entries"] / (caught_up - sent.started), 1),
        "fraud_p50_ms": _r(percentile(measured["fraud"], 0.5)),
        "fraud_p99_ms": _r(percentile(measured["fraud"], 0.99)),
        "statuses": measured["statuses"],
        "ledger_entries": measured["entries"],
        "baselines": {
            "bare_fastapi_requests_per_second": _r(bare_http["requests_per_second"], 1),
            "bare_fastapi_p50_ms": _r(bare_http["p50_ms"]),
            "bare_fastapi_p99_ms": _r(bare_http["p99_ms"]),
            "bare_postgres_inserts_per_second": _r(bare_insert, 1),
        },
        "ratios": {
            "payments_per_second_vs_bare_fastapi": _r(rate / bare_http["requests_per_second"], 3),
            "payments_per_second_vs_bare_inserts": _r(rate / bare_insert, 3),
            "initiation_p50_vs_bare_fastapi_p50": _r(
                percentile(initiation, 0.5) / bare_http["p50_ms"], 2
            ),
        },
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": datetime.now(UTC).date().isoformat(),
    }

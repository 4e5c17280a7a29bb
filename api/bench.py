"""``upi-engine bench`` (SPEC §9): the whole engine under load, against baselines measured
in the same run on the same machine, with a client that costs little.

The run:

1. a scratch data dir with its own embedded PostgreSQL, restarted once with
   ``pg_stat_statements`` loaded (that server only: the embedded default is unchanged, and
   durability is as shipped, ``fsync`` and ``synchronous_commit`` on), and ``upi-engine
   serve`` on a free port (the in-process bus, or Kafka at ``UPI_KAFKA_BOOTSTRAP`` with
   ``--bus kafka``); the per-merchant rate limit is lifted, everything else is as shipped,
   the mock NPCI switch's latencies and declines included;
2. a merchant, then realistic payments (``api.loadgen.traffic``: one payer each, each with
   its own ``merchant_order_id`` and ``Idempotency-Key``), sent by one of two clients:

   - closed loop (``payments`` with ``concurrency`` in flight): ``wrk`` with
     ``api/wrk/payments.lua``, which sends every payment of a file exactly once;
   - open loop (``rate`` for ``duration`` seconds): ``api.bench_client``, a fixed offered
     rate, each latency measured from the request's intended send time;

   ``initiation_*`` is the 202's latency as the client saw it, ``payments_per_second`` the
   accepted payments over the time from the first request sent to the last answer;
3. waiting until every payment is final or waits for its payer's verification (a fraud
   step-up), and every event is in the ledger: ``final_*`` is created → final status as the
   gateway recorded them, ``fraud_*`` initiation → fraud decision (queueing included, from
   the outbox), ``ledger_entries_per_second`` the ledger's entries over the time from the
   first payment sent until the ledger held every event;
4. what it cost, over steps 2 and 3 (:class:`Usage`): the CPU time of the engine's
   processes and of every PostgreSQL process, the statements the engine ran
   (``pg_stat_statements``) and its transactions, each per payment; the client's share
   of the machine's CPU;
5. the baselines: the same requests, by the same client with the same settings, against
   a bare FastAPI endpoint that only validates the body (the floor of the HTTP stack), and
   a bare PostgreSQL insert loop, one committed row per payment on ``concurrency``
   connections (the floor of a durable write), with the ratios of the engine to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
from fastapi import FastAPI

from api.bench_client import scheduled_count, summarize
from api.loadgen import percentile, traffic
from api.schemas import CreatePaymentRequest
from core.embedded import embedded_database_url, restart_embedded, scratch_data_dir
from core.processes import UPI_ENGINE, EngineProcess, free_port
from core.storage import plain_url
from payments.domain import FINAL_STATUSES, PaymentStatus

__all__ = [
    "WRK_SCRIPT",
    "BenchError",
    "Sending",
    "Usage",
    "WrkMissing",
    "bare_app",
    "cpu_of",
    "drive_open_loop",
    "drive_wrk",
    "find_wrk",
    "parse_wrk_output",
    "run_bench",
    "tree_cpu_seconds",
    "write_requests",
    "wrk_sending",
]

_FINAL = sorted(status.value for status in FINAL_STATUSES)
# The bench's own connection to the scratch server, as its own role: pg_stat_statements
# keys its rows by role (userid), database and query, so the bench's monitoring queries
# are told apart from the engine's by role.
_MONITOR_ROLE = "upi_bench_monitor"
WRK_SCRIPT = Path(__file__).parent / "wrk" / "payments.lua"
_WRK_THREADS = 1  # one core at most, of two shared with the engine: plenty for ~10^4 req/s
_PROGRESS_EVERY_S = 0.5


def _settle_timeout_s(payments: int) -> float:
    """How long after the last answer a run may take to settle: a backlog drains at tens
    of payments a second at worst, so a run still unsettled has a payment stuck (the error
    says how many)."""
    return 60.0 + payments / 10


class BenchError(Exception):
    """The run could not be completed (the message says why)."""


class WrkMissing(BenchError):
    """The closed loop needs ``wrk``, which is not installed."""


def find_wrk() -> str:
    """The ``wrk`` executable on the PATH; :class:`WrkMissing` when there is none."""
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing(
            "wrk not found: the closed loop (--payments) is driven by wrk; install it"
            " (apt-get install wrk), or run the open loop (--rate R --duration S)"
        )
    return found


# The bare endpoint of the HTTP baseline: the same request model, nothing behind it.
bare_app = FastAPI()


@bare_app.post("/v1/payments", status_code=202)
async def _bare_payment(request: CreatePaymentRequest) -> dict[str, str]:
    # The order id, as the engine's 202 carries it: the bench's clients pair answers by it.
    return {
        "transaction_id": uuid.uuid4().hex,
        "status": "INITIATED",
        "merchant_order_id": request.merchant_order_id,
    }


@bare_app.get("/readyz")
async def _bare_ready() -> dict[str, str]:
    return {"status": "ready"}


# --- the clients -------------------------------------------------------------------------


@dataclass
class Sending:
    """What a client's run sent and got back; times on the monotonic clock (seconds)."""

    client: str
    sent: int
    accepted: int  # 202s
    statuses: dict[str, int]  # every answer by status; "0": no answer
    errors: dict[str, int]  # the client's socket errors (no answer, or a broken one)
    started: float  # the first request sent
    finished: float  # the last answer
    latency_p50_ms: float
    latency_p99_ms: float
    cpu_seconds: float  # the client's own CPU time over its run
    cpu_share: float  # cpu_seconds / (its wall time x the machine's cores)
    open_loop: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds

    def refused(self) -> str:
        """The answers other than 202, and the errors, for a message."""
        other = {k: v for k, v in self.statuses.items() if k != "202"}
        return f"answers {other or 'none other'}, client errors {self.errors or 'none'}"


def write_requests(path: Path, bodies: Iterable[dict[str, Any]]) -> int:
    """The clients' request file: ``merchant_order_id<TAB>JSON body`` a line (the order id
    is also the ``Idempotency-Key``). Returns the number of lines."""
    n = 0
    with path.open("wb") as out:
        for body in bodies:
            order_id = body["merchant_order_id"]
            if "\t" in order_id or "\n" in order_id:
                raise ValueError(f"order id {order_id!r}: no tabs or newlines")
            out.write(order_id.encode() + b"\t" + orjson.dumps(body) + b"\n")
            n += 1
    return n


def parse_wrk_output(stdout: str) -> dict[str, Any]:
    """The JSON line that ``api/wrk/payments.lua``'s ``done()`` prints last (after wrk's own
    report); :class:`BenchError` when there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise BenchError(f"wrk printed no result: {stdout.strip()[-500:]!r}")


def wrk_sending(parsed: dict[str, Any], cpu_seconds: float, wall_s: float, cpus: int) -> Sending:
    """A wrk run's :class:`Sending` from its JSON and its CPU time over ``wall_s``."""
    statuses = {str(k): int(v) for k, v in parsed["statuses"].items()}
    errors = {k: int(v) for k, v in parsed["errors"].items() if k != "status" and v}
    answered = sum(statuses.values())
    unanswered = int(parsed["issued"]) - answered
    if unanswered > 0:
        statuses["0"] = unanswered
    if parsed["unpaired"]:  # 202s without their order id: latencies not measured
        errors["unpaired_202"] = int(parsed["unpaired"])
    latency = parsed["latency_ms"]
    return Sending(
        client=f"wrk ({_WRK_THREADS} thread, api/wrk/{WRK_SCRIPT.name})",
        sent=int(parsed["issued"]),
        accepted=statuses.get("202", 0),
        statuses=statuses,
        errors=errors,
        started=parsed["first_send_us"] / 1e6,
        finished=parsed["last_answer_us"] / 1e6,
        latency_p50_ms=float(latency["p50"]),
        latency_p99_ms=float(latency["p99"]),
        cpu_seconds=cpu_seconds,
        cpu_share=cpu_seconds / (wall_s * cpus) if wall_s > 0 else 0.0,
    )


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for
    (getrusage: the precise run time, where /proc counts clock ticks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def drive_wrk(
    wrk: str, url: str, api_key: str, requests: Path, count: int, concurrency: int
) -> Sending:
    """Every request of the file exactly once, ``concurrency`` in flight (wrk's closed
    loop). wrk runs for a duration; the script stops each thread after its share, and wrk
    is interrupted (SIGINT: it then reports) once every thread said so on stderr. Its CPU
    time is that of its whole life, from this process's children's usage: the only child
    that exits meanwhile is wrk."""
    duration_s = int(120 + count / 5)  # an upper bound: the run ends when all answered
    cpu_before = _children_cpu_s()
    spawned = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        wrk,
        *("-t", str(_WRK_THREADS), "-c", str(max(concurrency, _WRK_THREADS))),
        # --timeout is also the top of wrk's own histogram (a longer answer counts as a
        # "timeout" error there, and is still answered and measured by the script).
        *("-d", f"{duration_s}s", "--timeout", "60s", "-s", str(WRK_SCRIPT), url),
        *("--", str(requests), str(_WRK_THREADS), api_key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    done, errors = 0, []
    try:
        async with asyncio.timeout(duration_s + 60):
            while done < _WRK_THREADS and (line := await proc.stderr.readline()):
                if line.strip() == b"thread-done":
                    done += 1
                else:
                    errors.append(line.decode(errors="replace").strip())
            finished = asyncio.ensure_future(proc.communicate())
            # wrk ignores SIGINT until its threads are started: a run over before that
            # (a few fast requests) needs another one.
            while not finished.done():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                await asyncio.wait({finished}, timeout=1.0)
            stdout, stderr = finished.result()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk did not finish in {duration_s + 60} s") from None
    wall = time.monotonic() - spawned
    cpu = _children_cpu_s() - cpu_before
    text = stdout.decode(errors="replace")
    if done < _WRK_THREADS and "\n{" not in text:  # no report: wrk itself failed
        detail = "; ".join([*errors, stderr.decode(errors="replace").strip()])
        raise BenchError(f"wrk failed (exit {proc.returncode}): {detail[-500:]}")
    # A run cut short (wrk's duration) reports what it got: the count check says so.
    return wrk_sending(parse_wrk_output(text), cpu, wall, os.cpu_count() or 1)


async def drive_open_loop(
    url: str, api_key: str, requests: Path, rate: float, concurrency: int, cwd: Path
) -> Sending:
    """The requests of the file at ``rate`` a second (``api.bench_client`` in its own
    process), latencies from intended send times: ``concurrency`` connections opened
    before the start, more while every one is busy (up to the client's default, 1,000)."""
    port = url.rsplit(":", 1)[1]
    out = requests.with_name(f"open-loop-{uuid.uuid4().hex[:8]}.json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "api.bench_client", "--port", port, "--api-key", api_key),
        *("--requests", str(requests), "--rate", str(rate), "--connections", str(concurrency)),
        *("--out", str(out)),  # a file: its times can be megabytes
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cwd,  # not where the bench was started: a local "api" there must not be imported
    )
    _, stderr = await proc.communicate()
    try:
        raw = orjson.loads(out.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        detail = stderr.decode(errors="replace").strip()[-800:]
        raise BenchError(
            f"the open-loop client failed ({exc}, exit {proc.returncode}): {detail}"
        ) from None
    finally:
        out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise BenchError(f"the open-loop client failed: {stderr.decode().strip()[-800:]}")
    s = summarize(raw)
    return Sending(
        client=f"api.bench_client (open loop, {concurrency} connections at the start)",
        sent=s["sent"],
        accepted=s["accepted"],
        statuses=s["statuses"],
        errors=s["errors"],
        # From the schedule's start (request 0 was due then), on this machine's clock.
        started=raw["start_monotonic"],
        finished=raw["start_monotonic"] + s["seconds"],
        latency_p50_ms=s["latency_p50_ms"],
        latency_p99_ms=s["latency_p99_ms"],
        cpu_seconds=s["cpu_seconds"],
        cpu_share=s["cpu_share"],
        open_loop={
            "offered_rate": s["offered_rate"],
            "achieved_rate": s["achieved_rate"],
            "service_p50_ms": s["service_p50_ms"],
            "service_p99_ms": s["service_p99_ms"],
            "schedule_lag_p99_ms": s["schedule_lag_p99_ms"],
            "connection_wait_p99_ms": s["connection_wait_p99_ms"],
            "connections": s["connections"],
        },
    )


# --- what a run cost ---------------------------------------------------------------------


def cpu_of(times: Any) -> float:
    """A process's CPU seconds, with those of the children it has waited for: a
    PostgreSQL backend that exits during the run is still counted, in the postmaster's
    ``children_*`` times."""
    return float(times.user + times.system + times.children_user + times.children_system)


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """The CPU seconds of these processes and all their descendants (:func:`cpu_of` each;
    a descendant is counted by itself while it lives, in its parent's times once reaped)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            # Gone between the listing and now: it is in its parent's times next time.
            with contextlib.suppress(psutil.NoSuchProcess):
                total += cpu_of(proc.cpu_times())
    return total


def _process_cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True)
class Usage:
    """Counters read at the start and at the end of the measured window (sending and
    settling); their differences, per payment, are what the engine cost."""

    engine_cpu_s: float  # every ``serve`` process and its descendants
    postgres_cpu_s: float  # the postmaster and every process under it
    monitor_cpu_s: float  # the backend serving the bench's own queries (subtracted)
    statements: int  # pg_stat_statements calls of every role but the bench's own
    transaction_control: int  # of which BEGIN / COMMIT / ROLLBACK / END
    transactions: int = 0  # pg_stat_database: commits + rollbacks, the bench's included
    monitor_statements: int = 0  # the bench's own calls, each its own transaction

    def cost(self, before: Usage, payments: int) -> dict[str, float]:
        """Per payment, from ``before`` to this reading."""
        n = max(payments, 1)
        engine = self.engine_cpu_s - before.engine_cpu_s
        postgres = (self.postgres_cpu_s - before.postgres_cpu_s) - (
            self.monitor_cpu_s - before.monitor_cpu_s
        )
        statements = self.statements - before.statements
        control = self.transaction_control - before.transaction_control
        transactions = (self.transactions - before.transactions) - (
            self.monitor_statements - before.monitor_statements
        )
        return {
            "cpu_ms_per_payment": round((engine + postgres) * 1000 / n, 2),
            "engine_cpu_ms_per_payment": round(engine * 1000 / n, 2),
            "postgres_cpu_ms_per_payment": round(postgres * 1000 / n, 2),
            "statements_per_payment": round(statements / n, 2),
            "statements_per_payment_without_begin_commit": round((statements - control) / n, 2),
            "transactions_per_payment": round(transactions / n, 2),
        }


_TRANSACTION_CONTROL = r"^\s*(begin|start\s+transaction|commit|end|rollback)\M"


async def _read_usage(
    monitor: asyncpg.Connection, engine_pids: Sequence[int], postmaster: int, backend: int
) -> Usage:
    """The CPU and statement counters now. Statements are the top-level ones every role but
    the bench's monitoring role ran (pg_stat_statements, ``track = top``, utility
    statements included): every round trip the engine (or a CLI command) made."""
    row = await monitor.fetchrow(
        "SELECT coalesce(sum(s.calls), 0) AS n,"
        " coalesce(sum(s.calls) FILTER (WHERE s.query ~* $2), 0) AS control"
        " FROM pg_stat_statements s LEFT JOIN pg_roles r ON r.oid = s.userid"
        " WHERE r.rolname IS DISTINCT FROM $1",
        _MONITOR_ROLE,
        _TRANSACTION_CONTROL,
    )
    assert row is not None
    return Usage(
        engine_cpu_s=tree_cpu_seconds(engine_pids),
        postgres_cpu_s=tree_cpu_seconds([postmaster]),
        monitor_cpu_s=_process_cpu(backend),
        statements=int(row["n"]),
        transaction_control=int(row["control"]),
    )


async def _with_transactions(monitor: asyncpg.Connection, usage: Usage) -> Usage:
    """``usage`` with the database's transaction counters now (pg_stat_database: implicit
    single-statement transactions included). A backend publishes its counters at most once
    a second, and at exit: the end of the window is read once the engine has stopped, and
    the bench's own backend is made to publish first; its own transactions (one per
    statement, counted in pg_stat_statements) are subtracted in :meth:`Usage.cost`."""
    await monitor.execute("SELECT pg_stat_force_next_flush()")
    row = await monitor.fetchrow(
        "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database"
        "  WHERE datname = current_database()) AS xacts,"
        " (SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s"
        "  JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = $1) AS own",
        _MONITOR_ROLE,
    )
    assert row is not None
    return replace(usage, transactions=int(row["xacts"]), monitor_statements=int(row["own"]))


async def _top_statements(monitor: asyncpg.Connection, payments: int) -> list[dict[str, Any]]:
    """The engine's ten most frequent statements, per payment (pg_stat_statements)."""
    rows = await monitor.fetch(
        "SELECT s.query, sum(s.calls) AS calls, sum(s.total_exec_time) AS ms"
        " FROM pg_stat_statements s LEFT JOIN pg_roles r ON r.oid = s.userid"
        " WHERE r.rolname IS DISTINCT FROM $1 GROUP BY s.query ORDER BY calls DESC LIMIT 10",
        _MONITOR_ROLE,
    )
    n = max(payments, 1)
    return [
        {
            "per_payment": round(int(r["calls"]) / n, 2),
            "mean_ms": round(float(r["ms"]) / max(int(r["calls"]), 1), 3),
            "query": re.sub(r"\s+", " ", r["query"]).strip()[:120],
        }
        for r in rows
    ]


async def _scratch_server(data_dir: Path) -> str:
    """The scratch dir's embedded server, restarted with ``pg_stat_statements`` loaded, the
    extension created and the bench's monitoring role; returns its libpq URL."""
    url = plain_url(await asyncio.to_thread(embedded_database_url, data_dir))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        # Every statement the engine sends counts, BEGIN and COMMIT included (the
        # default, said here because the figures depend on it); nested ones do not.
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'top'")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track_utility = on")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.max = 10000")
    finally:
        await conn.close()
    url = plain_url(await asyncio.to_thread(restart_embedded, data_dir))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute(f"CREATE ROLE {_MONITOR_ROLE} LOGIN SUPERUSER")
    finally:
        await conn.close()
    return url


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])


# --- the engine --------------------------------------------------------------------------


def _env(data_dir: Path, bus: str, switch_latency_scale: float = 1.0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPI_")}
    env.update(
        {
            "UPI_DATA_DIR": str(data_dir),
            "UPI_LOG_LEVEL": "WARNING",
            "UPI_MERCHANT_RATE_PER_S": "1000000",
            "UPI_MERCHANT_RATE_BURST": "1000000",
            # The mock switch's shipped bank latencies (1) or a fraction of them (0: none).
            "UPI_NPCI_MOCK_LATENCY_SCALE": repr(switch_latency_scale),
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


def _servers(env: dict[str, str], data_dir: Path, processes: int, bus: str) -> list[EngineProcess]:
    """One ``serve`` with every role (on the in-process bus, with ``processes`` HTTP
    processes: ``UPI_GATEWAY_PROCESSES``), or on Kafka the gateway in one and the workers
    (the relay with its in-process consumers) in another; the gateway first."""
    # They run in the scratch dir: a .env file where the bench was started (one naming a
    # real database, say) must not reach them.
    if processes == 1 or bus == "memory":
        env = {**env, "UPI_GATEWAY_PROCESSES": str(processes)}
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
    event; returns when that happened (monotonic)."""
    while True:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM payments WHERE status = ANY($1::text[])) AS settled,"
            " (SELECT count(*) FROM outbox) AS events,"
            " (SELECT count(*) FROM ledger_entries) AS entries",
            [*_FINAL, PaymentStatus.PENDING_VERIFICATION.value],
        )
        assert row is not None
        if row["settled"] >= payments and row["entries"] >= row["events"]:
            return time.monotonic()
        if time.monotonic() > deadline:
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


@dataclass(frozen=True)
class _Load:
    """How to send: the closed loop (wrk) or the open loop (rate and duration)."""

    concurrency: int
    count: int
    wrk: str | None = None
    rate: float | None = None
    duration_s: float | None = None

    async def drive(self, url: str, api_key: str, requests: Path, cwd: Path) -> Sending:
        if self.rate is None:
            assert self.wrk is not None
            return await drive_wrk(self.wrk, url, api_key, requests, self.count, self.concurrency)
        return await drive_open_loop(url, api_key, requests, self.rate, self.concurrency, cwd)


async def _bare_http(load: _Load, requests: Path, data_dir: Path) -> Sending:
    port = free_port()
    command = (sys.executable, "-m", "uvicorn", "api.bench:bare_app", "--port", str(port))
    server = EngineProcess(
        port,
        dict(os.environ),
        data_dir / "bare.log",
        (*command, "--log-level", "warning", "--no-access-log"),
        data_dir,
    )
    try:
        await asyncio.to_thread(server.start, 60)
        sent = await load.drive(server.url, "bare", requests, data_dir)
    finally:
        server.stop()
    if sent.accepted != sent.sent:
        raise BenchError(f"the bare endpoint accepted {sent.accepted} of {sent.sent}")
    return sent


async def _progress(
    conn: asyncpg.Connection, on_progress: Callable[[int], None], stop: asyncio.Event
) -> None:
    """Reports the payments the engine holds every half second, until ``stop``."""
    while not stop.is_set():
        on_progress(int(await conn.fetchval("SELECT count(*) FROM payments")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _PROGRESS_EVERY_S)


def _r(value: float, digits: int = 2) -> float:
    return round(value, digits)


def _bodies(seed: int, count: int) -> Iterator[dict[str, Any]]:
    return itertools.islice(traffic(seed, f"bench-{uuid.uuid4().hex[:6]}"), count)


@dataclass
class _EngineRun:
    """One run of the engine under the load: what was sent, when every payment was settled,
    what it cost, what the database holds."""

    count: int
    sent: Sending
    caught_up: float
    before: Usage
    after: Usage
    top: list[dict[str, Any]]
    measured: dict[str, Any]
    conn_url: str  # the scratch server it ran on

    @property
    def settled_per_second(self) -> float:
        return self.count / max(self.caught_up - self.sent.started, 1e-9)


async def _run_engine(
    load: _Load,
    data_dir: Path,
    conn_url: str,
    env: dict[str, str],
    requests: Path,
    count: int,
    processes: int,
    bus: str,
    on_phase: Callable[[str], None],
    on_progress: Callable[[int], None],
) -> _EngineRun:
    """Steps 1-4 of the module's docstring on the scratch server at ``conn_url``."""
    postmaster = _postmaster_pid(data_dir)
    servers = _servers(env, data_dir, processes, bus)
    engine = servers[0]  # the gateway
    monitor = await asyncpg.connect(conn_url, user=_MONITOR_ROLE)
    try:
        backend = int(await monitor.fetchval("SELECT pg_backend_pid()"))
        try:
            for server in servers:
                await asyncio.to_thread(server.start, 120)
            api_key = await asyncio.to_thread(_merchant, env, data_dir)
            engine_pids = [s.proc.pid for s in servers if s.proc is not None]
            await monitor.execute("SELECT pg_stat_statements_reset()")
            before = await _with_transactions(
                monitor, await _read_usage(monitor, engine_pids, postmaster, backend)
            )
            on_phase("sending payments")
            stop = asyncio.Event()
            progress = asyncio.create_task(_progress(monitor, on_progress, stop))
            try:
                sent = await load.drive(engine.url, api_key, requests, data_dir)
            finally:
                stop.set()
                await progress
            created = int(await monitor.fetchval("SELECT count(*) FROM payments"))
            on_progress(created)
            if sent.accepted != count or created != count:
                raise BenchError(
                    f"{sent.accepted} of {count} payments accepted, {created} created:"
                    f" {sent.refused()}"
                )
            on_phase("waiting for final statuses and the ledger")
            caught_up = await _wait_settled(
                monitor, count, sent.started, sent.finished + _settle_timeout_s(count)
            )
            after = await _read_usage(monitor, engine_pids, postmaster, backend)
            top = await _top_statements(monitor, count)
            measured = await _measured(monitor)
        finally:
            for server in servers:
                server.stop()
        # Its backends have exited, so every transaction of the engine is counted.
        after = await _with_transactions(monitor, after)
    finally:
        await monitor.close()
    return _EngineRun(count, sent, caught_up, before, after, top, measured, conn_url)


async def _traced_rounds(
    first: _EngineRun,
    rounds: int,
    sample_ratio: float,
    seed: int,
    run: Callable[..., Any],
    on_phase: Callable[[str], None],
) -> dict[str, Any]:
    """Traces off versus on in the same run: after ``first`` (off), the engine again with
    every process tracing to a local sink (:class:`api.otlp_sink.OtlpSink`); then pairs
    on then off, off then on… ``rounds`` pairs in all, interleaved and in alternating
    order so that a change of the machine's load, or a cost the run before leaves to the
    next (its server's shutdown, the page cache), falls on both sides; each run on a
    scratch server of its own."""
    from api.otlp_sink import OtlpSink

    pairs: list[dict[str, Any]] = []
    for n in range(rounds):
        with OtlpSink() as sink:
            env = {"UPI_OTEL_ENDPOINT": sink.endpoint, "UPI_OTEL_SAMPLE_RATIO": repr(sample_ratio)}
            if n == 0:
                off = first
            elif n % 2 == 0:
                on_phase(f"traces off, round {n + 1} of {rounds}")
                off = await run(seed + n, {})
            on_phase(f"traces on, round {n + 1} of {rounds}")
            on = await run(seed + n, env)
            if n % 2:  # on first in every other pair: a drift along the run cancels out
                on_phase(f"traces off, round {n + 1} of {rounds}")
                off = await run(seed + n, {})
        # The engines flushed their spans when they stopped: every one is counted.
        off_cost = off.after.cost(off.before, off.count)
        on_cost = on.after.cost(on.before, on.count)
        pairs.append(
            {
                "first": "on" if n % 2 else "off",
                "off_settled_per_second": _r(off.settled_per_second, 1),
                "on_settled_per_second": _r(on.settled_per_second, 1),
                "on_vs_off": _r(on.settled_per_second / off.settled_per_second, 3),
                "off_engine_cpu_ms_per_payment": off_cost["engine_cpu_ms_per_payment"],
                "on_engine_cpu_ms_per_payment": on_cost["engine_cpu_ms_per_payment"],
                "off_postgres_cpu_ms_per_payment": off_cost["postgres_cpu_ms_per_payment"],
                "on_postgres_cpu_ms_per_payment": on_cost["postgres_cpu_ms_per_payment"],
                "off_initiation_p99_ms": _r(off.sent.latency_p99_ms),
                "on_initiation_p99_ms": _r(on.sent.latency_p99_ms),
                "spans_exported": sink.spans,
                "spans_per_payment": _r(sink.spans / max(on.count, 1)),
                "sink_refused": sink.refused,
            }
        )
    off_rate = sum(p["off_settled_per_second"] for p in pairs) / len(pairs)
    on_rate = sum(p["on_settled_per_second"] for p in pairs) / len(pairs)
    off_cpu = sum(p["off_engine_cpu_ms_per_payment"] for p in pairs) / len(pairs)
    on_cpu = sum(p["on_engine_cpu_ms_per_payment"] for p in pairs) / len(pairs)
    return {
        "sample_ratio": sample_ratio,
        "exporter": "OTLP/HTTP to a local sink that accepts and discards (api/otlp_sink.py)",
        "rounds": pairs,
        "settled_per_second_off": _r(off_rate, 1),
        "settled_per_second_on": _r(on_rate, 1),
        "settled_on_vs_off": _r(on_rate / off_rate, 3),
        "engine_cpu_ms_per_payment_off": _r(off_cpu),
        "engine_cpu_ms_per_payment_on": _r(on_cpu),
        "engine_cpu_on_vs_off": _r(on_cpu / off_cpu, 3) if off_cpu else None,
    }


async def run_bench(
    payments: int,
    concurrency: int,
    bus: str,
    *,
    processes: int = 1,
    rate: float | None = None,
    duration_s: float | None = None,
    switch_latency_scale: float = 1.0,
    seed: int = 20261125,
    trace_rounds: int = 0,
    trace_sample_ratio: float | None = None,
    on_phase: Callable[[str], None] = lambda phase: None,
    on_progress: Callable[[int], None] = lambda payments: None,
) -> dict[str, Any]:
    """The run (see the module's docstring): the closed loop sends ``payments``, the open
    loop (``rate`` and ``duration_s`` given) ``rate x duration_s``. With ``trace_rounds``,
    the engine runs again that many times with tracing on, interleaved with runs with it
    off (:func:`_traced_rounds`): the result's ``traces``."""
    if rate is None:
        load = _Load(concurrency, payments, wrk=find_wrk())
    else:
        assert duration_s is not None
        load = _Load(
            concurrency, scheduled_count(rate, duration_s), rate=rate, duration_s=duration_s
        )

    async def engine_in(data_dir: Path, seed: int, extra_env: dict[str, str]) -> _EngineRun:
        requests = data_dir / "requests.tsv"
        count = await asyncio.to_thread(write_requests, requests, _bodies(seed, load.count))
        env = {**_env(data_dir, bus, switch_latency_scale), **extra_env}
        on_phase("starting the engine")
        # The bench starts the scratch server and holds it: it outlives the engine, for
        # the insert baseline; the scratch dir's clean-up stops it.
        conn_url = await _scratch_server(data_dir)
        return await _run_engine(
            load, data_dir, conn_url, env, requests, count, processes, bus, on_phase, on_progress
        )

    async def another(seed: int, extra_env: dict[str, str]) -> _EngineRun:
        with scratch_data_dir("ub") as data_dir:
            return await engine_in(data_dir, seed, extra_env)

    with scratch_data_dir("ub") as data_dir:
        first = await engine_in(data_dir, seed, {})
        on_phase("measuring the baselines")
        requests = data_dir / "requests.tsv"
        bare_http = await _bare_http(load, requests, data_dir)
        bare_insert = await _bare_inserts(first.conn_url, first.count, concurrency)
    from core.config import Settings

    shipped_ratio = Settings.model_fields["otel_sample_ratio"].default
    traces = (
        await _traced_rounds(
            first,
            trace_rounds,
            # Unset: the engine's own default, what tracing costs as shipped.
            shipped_ratio if trace_sample_ratio is None else trace_sample_ratio,
            seed,
            another,
            on_phase,
        )
        if trace_rounds
        else None
    )
    count, sent, caught_up = first.count, first.sent, first.caught_up
    before, after, top, measured = first.before, first.after, first.top, first.measured
    cost = after.cost(before, count)
    result: dict[str, Any] = {
        "payments": count,
        "concurrency": concurrency,
        "bus": bus,
        "processes": processes,
        "switch_latency_scale": switch_latency_scale,
        "client": sent.client,
        "loop": "closed" if rate is None else "open",
        "sent": sent.sent,
        "accepted": sent.accepted,
        "seconds": _r(sent.seconds, 3),
        "payments_per_second": _r(sent.rate, 1),
    }
    if rate is not None:
        result.update(
            {
                "duration": duration_s,
                "offered_rate": rate,
                "achieved_rate": _r(sent.open_loop["achieved_rate"], 1),
                "connections": int(sent.open_loop["connections"]),
            }
        )
    result.update(
        {
            "initiation_p50_ms": _r(sent.latency_p50_ms),
            "initiation_p99_ms": _r(sent.latency_p99_ms),
        }
    )
    if rate is not None:
        result.update({k: _r(v) for k, v in sent.open_loop.items() if k.endswith("_ms")})
    result.update(
        {
            "final_p50_ms": _r(percentile(measured["final"], 0.5)),
            "final_p99_ms": _r(percentile(measured["final"], 0.99)),
            # Payments completed end to end: all of them over the time until the last settled.
            "settled_per_second": _r(count / (caught_up - sent.started), 1),
            "ledger_entries_per_second": _r(measured["entries"] / (caught_up - sent.started), 1),
            "fraud_p50_ms": _r(percentile(measured["fraud"], 0.5)),
            "fraud_p99_ms": _r(percentile(measured["fraud"], 0.99)),
            "client_cpu_share": _r(sent.cpu_share, 4),
            **cost,
            "statuses": measured["statuses"],
            "ledger_entries": measured["entries"],
            "baselines": {
                "bare_fastapi_requests_per_second": _r(bare_http.rate, 1),
                "bare_fastapi_p50_ms": _r(bare_http.latency_p50_ms),
                "bare_fastapi_p99_ms": _r(bare_http.latency_p99_ms),
                "bare_fastapi_client_cpu_share": _r(bare_http.cpu_share, 4),
                "bare_postgres_inserts_per_second": _r(bare_insert, 1),
            },
            "ratios": {
                "payments_per_second_vs_bare_fastapi": _r(sent.rate / bare_http.rate, 3),
                "payments_per_second_vs_bare_inserts": _r(sent.rate / bare_insert, 3),
                "initiation_p50_vs_bare_fastapi_p50": _r(
                    sent.latency_p50_ms / max(bare_http.latency_p50_ms, 1e-9), 2
                ),
            },
            "top_statements": top,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "date": datetime.now(UTC).date().isoformat(),
        }
    )
    if traces is not None:
        result["traces"] = traces
    return result

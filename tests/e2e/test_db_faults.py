"""Faults between the engine and its PostgreSQL (issue 14), through ``tests/faultproxy.py``:
a slow database, connections reset in the middle of transactions, a blackholed database.

``serve`` (every role, in-process bus) reaches a real PostgreSQL only through the proxy.
Whatever the fault, clients get 202 or 503 (never a 500); once it is over, the merchant's
retries (same keys) go through and the invariants hold (``tests/invariants.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.e2e.harness import (
    NPCI_TWENTY_TIMES_FASTER,
    Answers,
    Serve,
    base_env,
    create_merchant,
    only_202_or_503,
    retry_until_accepted,
)
from tests.faultproxy import FaultProxy
from tests.invariants import check_invariants

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def proxied(db_url: str) -> Iterator[tuple[FaultProxy, dict[str, str]]]:
    """A fresh database on the test PostgreSQL, reachable only through a fault proxy."""
    url = urlparse(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    socket_dir = parse_qs(url.query)["host"][0]
    with FaultProxy(Path(socket_dir) / ".s.PGSQL.5432") as proxy:
        yield (
            proxy,
            base_env(
                UPI_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{proxy.port}{url.path}",
                UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
                UPI_DATA_DIR="/tmp/unused-data-dir",
                UPI_FRAUD_VERIFICATION_TTL_S="3",
                UPI_MERCHANT_RATE_PER_S="100000",
                UPI_MERCHANT_RATE_BURST="100000",
                **NPCI_TWENTY_TIMES_FASTER,
            ),
        )


def _body(n: int) -> dict[str, Any]:
    return {
        "payer_vpa": f"proxied{n % 30:02d}@okaxis",
        "amount_paise": 100 + (n * 53) % 4_000,
        "merchant_order_id": f"pf-{n}",
    }


async def _send(url: str, api_key: str, numbers: range, gap_s: float) -> Answers:
    answers: Answers = {}
    headers = {"Authorization": f"Bearer {api_key}"}

    async def one(client: httpx.AsyncClient, n: int) -> None:
        try:
            answers[n] = await client.post(
                "/v1/payments", json=_body(n), headers={**headers, "Idempotency-Key": f"pf-{n}"}
            )
        except httpx.HTTPError:
            answers[n] = None

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        tasks = []
        for n in numbers:
            tasks.append(asyncio.create_task(one(client, n)))
            await asyncio.sleep(gap_s)
        await asyncio.gather(*tasks)
    return answers


def _only_202_or_503(answers: Answers) -> Counter[int]:
    return only_202_or_503(answers, {"database_unavailable"})


def _retry_and_check(server: Serve, env: dict[str, str], api_key: str, answers: Answers) -> None:
    """The merchant retries what got no 202 (same key); then every invariant."""
    acked = retry_until_accepted(server.url, api_key, answers, _body, lambda n: f"pf-{n}")
    check_invariants(env, set(acked.values()), timeout=120)


def test_every_database_call_200ms_slower(proxied):
    proxy, env = proxied
    server = Serve(env).start()
    try:
        merchant = create_merchant(env)
        proxy.latency(0.2)  # each way: 400 ms more per round trip
        answers = asyncio.run(_send(server.url, merchant["api_key"], range(24), 0.1))
        assert _only_202_or_503(answers) == Counter({202: 24}), "slow is not down"
        proxy.clear()
        _retry_and_check(server, env, merchant["api_key"], answers)
    finally:
        server.stop()


def test_connections_reset_in_the_middle_of_transactions(proxied):
    proxy, env = proxied
    server = Serve(env).start()
    try:
        merchant = create_merchant(env)
        # Work for the consumers first, then requests that are slow enough to be caught
        # half-way by the reset, with the consumers still busy.
        warmup = asyncio.run(_send(server.url, merchant["api_key"], range(30), 0.0))
        proxy.latency(0.15)

        async def reset_soon() -> Answers:
            sending = asyncio.create_task(
                _send(server.url, merchant["api_key"], range(30, 50), 0.02)
            )
            await asyncio.sleep(0.8)
            reset = await asyncio.to_thread(proxy.reset)
            assert reset > 0
            proxy.clear()
            return await sending

        answers = {**warmup, **asyncio.run(reset_soon())}
        statuses = _only_202_or_503(answers)
        assert statuses[503] > 0, f"a request should have lost its transaction: {statuses}"
        _retry_and_check(server, env, merchant["api_key"], answers)
        log = server.log.read_text()
        # A consumer's transaction was cut too, and was waited out, not dead-lettered.
        assert "database unavailable, waiting" in log or "database connection lost" in log
    finally:
        server.stop()


def test_database_blackholed_for_10_s(proxied):
    proxy, env = proxied
    server = Serve(env).start()
    readiness: list[tuple[int, Any]] = []
    try:
        merchant = create_merchant(env)

        async def scenario() -> Answers:
            async def watch() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
                    while True:
                        with contextlib.suppress(httpx.HTTPError):
                            r = await client.get("/readyz")
                            readiness.append((r.status_code, r.json()))
                        await asyncio.sleep(0.25)

            watcher = asyncio.create_task(watch())
            sending = asyncio.create_task(_send(server.url, merchant["api_key"], range(120), 0.1))
            await asyncio.sleep(2)
            proxy.blackhole(10)
            answers = await sending
            await asyncio.sleep(1)
            watcher.cancel()
            return answers

        answers = asyncio.run(scenario())
        _only_202_or_503(answers)
        assert any(s == 503 and body["missing"] == ["database"] for s, body in readiness)
        assert readiness[-1][0] == 200, readiness[-3:]
        _retry_and_check(server, env, merchant["api_key"], answers)
    finally:
        server.stop()


def test_database_restarted_under_the_engine(tmp_path):
    """Distributed mode (no supervisor of ours): the operator's PostgreSQL is killed and
    started again; every pooled connection is broken, and replaced."""
    from core.embedded import embedded_running, restart_if_dead
    from tests.support import embedded_postgres_server

    with embedded_postgres_server() as (pg, url_template):
        env = base_env(
            UPI_DATABASE_URL=url_template.format(db="postgres"),
            UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
            UPI_DATA_DIR="/tmp/unused-data-dir",
            # Forty first payments to one new shop within seconds look like a mule's
            # fan-in to the model: step-ups, which expire (BLOCKED) 3 s later.
            UPI_FRAUD_VERIFICATION_TTL_S="3",
            UPI_MERCHANT_RATE_PER_S="100000",
            UPI_MERCHANT_RATE_BURST="100000",
            **NPCI_TWENTY_TIMES_FASTER,
        )
        server = Serve(env).start()
        try:
            merchant = create_merchant(env)
            before = asyncio.run(_send(server.url, merchant["api_key"], range(20), 0.02))
            pgdata = Path(pg.pgdata)
            os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), 9)
            while embedded_running(pgdata.parent):
                time.sleep(0.05)
            # Started again as an operator's supervisor would (crash recovery); the dead
            # server's backends may hold its memory for a moment.
            for _ in range(40):
                try:
                    if restart_if_dead(pgdata):
                        break
                except subprocess.CalledProcessError:
                    time.sleep(0.5)
            assert embedded_running(pgdata.parent)
            deadline = time.monotonic() + 30
            while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
                ready = httpx.get(f"{server.url}/readyz", timeout=5).text
                assert time.monotonic() < deadline, f"not ready again after the restart: {ready}"
                time.sleep(0.2)
            after = asyncio.run(_send(server.url, merchant["api_key"], range(20, 40), 0.02))
            # Connections broken by the restart were replaced: the next requests all pass.
            assert _only_202_or_503(after) == Counter({202: 20})
            _only_202_or_503(before)
            _retry_and_check(server, env, merchant["api_key"], {**before, **after})
        finally:
            server.stop()

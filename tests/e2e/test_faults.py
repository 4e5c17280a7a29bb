"""Faults on the embedded default (issue 14): the engine's PostgreSQL dies under load.

While it is down, requests get 503 ``database_unavailable`` with ``Retry-After``, never a
500; ``/readyz`` names the database; the engine starts the server again and is ready
within 30 s; the merchant's retries (same keys) go through; the invariants hold. If the
server cannot be started again, ``serve`` exits 1 with one clear line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import NPCI_TWENTY_TIMES_FASTER, Serve, create_merchant
from tests.invariants import check_invariants

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAULT_ENV = {
    "UPI_FRAUD_VERIFICATION_TTL_S": "3",
    "UPI_MERCHANT_RATE_PER_S": "100000",
    "UPI_MERCHANT_RATE_BURST": "100000",
    **NPCI_TWENTY_TIMES_FASTER,
}


def _body(n: int) -> dict[str, Any]:
    return {
        "payer_vpa": f"faulty{n % 40:02d}@okhdfc",
        "amount_paise": 100 + (n * 37) % 5_000,
        "merchant_order_id": f"fault-{n}",
    }


def _kill_postmaster(data_dir: str) -> float:
    pid = int((Path(data_dir) / "pg" / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


async def _load(
    url: str, api_key: str, rate: float, seconds: float, on_tick: Any
) -> dict[int, httpx.Response | None]:
    """An open loop at ``rate``/s for ``seconds``; ``on_tick(t)`` runs every send."""
    answers: dict[int, httpx.Response | None] = {}
    headers = {"Authorization": f"Bearer {api_key}"}
    started = time.monotonic()

    async def one(client: httpx.AsyncClient, n: int) -> None:
        try:
            answers[n] = await client.post(
                "/v1/payments",
                json=_body(n),
                headers={**headers, "Idempotency-Key": f"fault-{n}"},
            )
        except httpx.HTTPError:
            answers[n] = None

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        tasks = []
        n = 0
        while (elapsed := time.monotonic() - started) < seconds:
            on_tick(elapsed)
            tasks.append(asyncio.create_task(one(client, n)))
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return answers


def test_postgres_killed_under_load_gives_503s_then_heals_with_nothing_lost(embedded_env):
    env = {**embedded_env, **FAULT_ENV}
    data_dir = env["UPI_DATA_DIR"]
    server = Serve(env).start()
    merchant = create_merchant(env)
    readiness: list[tuple[float, int, Any]] = []
    killed: list[float] = []

    def on_tick(elapsed: float) -> None:
        if elapsed >= 2 and not killed:
            killed.append(_kill_postmaster(data_dir))

    async def watch_ready() -> None:  # /readyz every 100 ms, beside the load
        async with httpx.AsyncClient(base_url=server.url, timeout=3) as client:
            while True:
                try:
                    r = await client.get("/readyz")
                    readiness.append((time.monotonic(), r.status_code, r.json()))
                except httpx.HTTPError:
                    readiness.append((time.monotonic(), 0, None))
                await asyncio.sleep(0.1)

    def ready_again() -> bool:
        return any(status == 200 and t > killed[0] for t, status, _ in readiness)

    async def scenario() -> dict[int, httpx.Response | None]:
        watcher = asyncio.create_task(watch_ready())
        try:
            answers = await _load(server.url, merchant["api_key"], 25, 12, on_tick)
            # The load may end before the server is back (a slow box): watch on, up to
            # the 30 s the engine has.
            while not ready_again() and time.monotonic() < killed[0] + 35:
                await asyncio.sleep(0.2)
            return answers
        finally:
            watcher.cancel()

    try:
        answers = asyncio.run(scenario())
        statuses = Counter(r.status_code if r is not None else 0 for r in answers.values())
        assert set(statuses) <= {202, 503}, f"only 202 or 503 while the database died: {statuses}"
        unavailable = [r for r in answers.values() if r is not None and r.status_code == 503]
        assert unavailable, f"the outage should have been seen: {statuses}"
        for r in unavailable:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "database_unavailable"
            assert int(r.headers["Retry-After"]) >= 1
        # /readyz said what was missing, then was ready again within 30 s of the kill.
        down = [body for _, status, body in readiness if status == 503]
        assert down and all(body["missing"] == ["database"] for body in down), down[:3]
        back = [t for t, status, _ in readiness if status == 200 and t > killed[0]]
        log_tail = "\n".join(server.log.read_text().splitlines()[-30:])
        assert back and back[0] - killed[0] < 30, f"not ready within 30 s:\n{log_tail}"
        assert server.proc is not None and server.proc.poll() is None
        assert "embedded PostgreSQL started again" in server.log.read_text()

        # The merchant retries every request that got no 202, with the same key.
        acked = {
            f"fault-{n}": r.json()["transaction_id"]
            for n, r in answers.items()
            if r is not None and r.status_code == 202
        }
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for n, r in answers.items():
                if r is not None and r.status_code == 202:
                    continue
                again = client.post(
                    "/v1/payments",
                    json=_body(n),
                    headers={**headers, "Idempotency-Key": f"fault-{n}"},
                )
                assert again.status_code == 202, again.text
                acked[f"fault-{n}"] = again.json()["transaction_id"]
        assert len(acked) == len(answers)
        checked = check_invariants(env, set(acked.values()), timeout=90)
        assert checked.payments == len(answers)
    finally:
        server.stop()


def test_postgres_that_cannot_be_started_again_makes_serve_exit_1_with_one_line(embedded_env):
    env = {**embedded_env, "UPI_EMBEDDED_RESTART_WITHIN_S": "3"}
    data_dir = env["UPI_DATA_DIR"]
    server = Serve(env).start()
    assert server.proc is not None
    # A setting PostgreSQL refuses at start: the server cannot come back.
    auto_conf = Path(data_dir) / "pg" / "postgresql.auto.conf"
    auto_conf.write_text(auto_conf.read_text() + "\nshared_buffers = 'a lot'\n")
    _kill_postmaster(data_dir)
    assert server.proc.wait(60) == 1
    errors = [line for line in server.tail(400).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, server.tail()
    assert "could not be started again" in errors[0] and "log" in errors[0]

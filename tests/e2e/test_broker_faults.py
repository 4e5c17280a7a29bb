"""Faults of the broker in distributed mode (issue 14): Tansu killed with SIGKILL and
restarted on the same port in the middle of a load, and a broker blackholed for 10 s.

Tansu keeps its log in memory, so a restarted Tansu is an empty broker: the relay must
notice that the broker lost what it had acknowledged and publish the outbox again; the
inboxes make the repeats harmless. Clients get 202 or 503, never a 500; afterwards every
invariant holds: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

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
from tests.support import Tansu, free_port, unique_name

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _env(db_url: str, bootstrap: str) -> dict[str, str]:
    return base_env(
        UPI_DATABASE_URL=db_url,
        UPI_BUS="kafka",
        UPI_KAFKA_BOOTSTRAP=bootstrap,
        UPI_KAFKA_IDEMPOTENCE="false",
        UPI_KAFKA_TOPIC_PREFIX=unique_name("bf"),
        UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        UPI_DATA_DIR="/tmp/unused-data-dir",
        UPI_FRAUD_VERIFICATION_TTL_S="3",
        UPI_MERCHANT_RATE_PER_S="100000",
        UPI_MERCHANT_RATE_BURST="100000",
        **NPCI_TWENTY_TIMES_FASTER,
    )


def _body(n: int) -> dict[str, Any]:
    return {
        "payer_vpa": f"broker{n % 30:02d}@ybl",
        "amount_paise": 100 + (n * 41) % 4_000,
        "merchant_order_id": f"bf-{n}",
    }


async def _load(url: str, api_key: str, count: int, gap_s: float, at: dict[int, Any]) -> Answers:
    """``count`` payments ``gap_s`` apart; ``at[n]()`` runs (in a thread) before the n-th."""
    answers: Answers = {}
    headers = {"Authorization": f"Bearer {api_key}"}

    async def one(client: httpx.AsyncClient, n: int) -> None:
        try:
            answers[n] = await client.post(
                "/v1/payments", json=_body(n), headers={**headers, "Idempotency-Key": f"bf-{n}"}
            )
        except httpx.HTTPError:
            answers[n] = None

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        tasks = []
        for n in range(count):
            if n in at:
                await asyncio.to_thread(at[n])
            tasks.append(asyncio.create_task(one(client, n)))
            await asyncio.sleep(gap_s)
        await asyncio.gather(*tasks)
    return answers


def _settle(server: Serve, env: dict[str, str], api_key: str, answers: Answers) -> None:
    only_202_or_503(answers, {"bus_unavailable", "database_unavailable"})
    acked = retry_until_accepted(server.url, api_key, answers, _body, lambda n: f"bf-{n}")
    check_invariants(env, set(acked.values()), timeout=120)


def test_broker_killed_and_restarted_empty_mid_load(db_url):
    broker = Tansu().start()
    env = _env(db_url, f"127.0.0.1:{broker.port}")
    server = Serve(env).start()
    try:
        merchant = create_merchant(env)

        def restart() -> None:
            time.sleep(1.0)
            broker.start()  # same port, empty log

        answers = asyncio.run(
            _load(server.url, merchant["api_key"], 300, 0.05, {80: broker.kill, 100: restart})
        )
        _settle(server, env, merchant["api_key"], answers)
        assert "lost its log" in server.log.read_text()
    finally:
        server.stop()
        broker.stop()


def test_broker_blackholed_for_10_s(db_url):
    # The broker advertises the proxy's address, so every client connection goes through.
    advertised = free_port()
    broker = Tansu(advertised_port=advertised)
    with FaultProxy(("127.0.0.1", broker.port), port=advertised) as proxy:
        broker.start()
        env = _env(db_url, f"127.0.0.1:{advertised}")
        server = Serve(env).start()
        try:
            merchant = create_merchant(env)
            answers = asyncio.run(
                _load(server.url, merchant["api_key"], 200, 0.1, {30: lambda: proxy.blackhole(10)})
            )
            _settle(server, env, merchant["api_key"], answers)
        finally:
            server.stop()
            broker.stop()

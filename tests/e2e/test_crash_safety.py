"""SIGKILL the engine in the middle of a burst of payments, restart it, and check that every
acknowledged payment reaches exactly one final status and no effect was applied twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict

import httpx
import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import create_async_engine

from core.events import Envelope
from core.storage import asyncpg_url
from npcisim.mock import opening_balance
from tests.e2e.harness import NPCI_TWENTY_TIMES_FASTER, Serve, cli, create_merchant

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FINAL = {"SUCCESS", "FAILED", "BLOCKED", "REVERSED"}
PAYERS = [f"payer{i:02d}@okhdfc" for i in range(12)] + ["success@oksbi", "insufficient@ybl"]


def request_body(n: int) -> dict[str, object]:
    return {
        "payer_vpa": PAYERS[n % len(PAYERS)],
        "amount_paise": 100 + (n * 37) % 5_000,
        "merchant_order_id": f"burst-{n}",
    }


async def burst(url: str, api_key: str, total: int, kill_after: int, server: Serve):
    """Fire ``total`` payments; SIGKILL the server once ``kill_after`` were acknowledged."""
    acked: dict[str, str] = {}  # idempotency key -> transaction id
    unacked: list[int] = []
    headers = {"Authorization": f"Bearer {api_key}"}
    gate = asyncio.Semaphore(16)
    killed = asyncio.Event()

    async def one(client: httpx.AsyncClient, n: int) -> None:
        async with gate:
            try:
                r = await client.post(
                    "/v1/payments",
                    json=request_body(n),
                    headers={**headers, "Idempotency-Key": f"burst-{n}"},
                )
            except httpx.HTTPError:
                unacked.append(n)
                return
            if r.status_code != 202:
                unacked.append(n)
                return
            acked[f"burst-{n}"] = r.json()["transaction_id"]
            if len(acked) >= kill_after and not killed.is_set():
                killed.set()
                server.kill()

    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        await asyncio.gather(*(one(client, n) for n in range(total)))
    return acked, unacked


def test_sigkill_mid_burst_then_restart_loses_nothing_and_repeats_nothing(embedded_env):
    # About 21 payments per payer here: above the default daily count of 20. Such bursts
    # are stepped up or blocked by the fraud engine; nobody verifies, so the stepped-up
    # ones expire (shortened here) and fail: every payment still ends in one final status.
    # The merchant's rate limit (50/s) is lifted: the gateway now takes the burst faster than
    # that, and a 429 would count as unacknowledged here, then again on the retries.
    embedded_env = {
        **embedded_env,
        "UPI_PAYER_DAILY_MAX_COUNT": "1000",
        "UPI_FRAUD_VERIFICATION_TTL_S": "3",
        "UPI_MERCHANT_RATE_PER_S": "100000",
        "UPI_MERCHANT_RATE_BURST": "100000",
        **NPCI_TWENTY_TIMES_FASTER,
    }
    server = Serve(embedded_env).start()
    merchant = create_merchant(embedded_env)
    headers = {"Authorization": f"Bearer {merchant['api_key']}"}
    acked, unacked = asyncio.run(burst(server.url, merchant["api_key"], 300, 80, server))
    assert server.proc is not None and server.proc.returncode == -9
    assert len(acked) >= 80 and unacked, "the kill should land mid-burst"

    url = cli(embedded_env, "db", "url").stdout.strip()
    in_flight = asyncio.run(count_unfinished(url))
    assert in_flight > 0, "the kill should leave acknowledged payments unfinished"

    restarted = Serve(embedded_env).start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=10) as client:
            # The merchant retries what it never got an answer for, with the same keys.
            for n in unacked:
                r = client.post(
                    "/v1/payments",
                    json=request_body(n),
                    headers={**headers, "Idempotency-Key": f"burst-{n}"},
                )
                assert r.status_code == 202, r.text
                acked[f"burst-{n}"] = r.json()["transaction_id"]
            assert len(acked) == 300
            deadline = time.monotonic() + 60
            pending = set(acked.values())
            while pending and time.monotonic() < deadline:
                for txn in list(pending):
                    body = client.get(f"/v1/payments/{txn}", headers=headers).json()
                    if body["status"] in FINAL:
                        pending.discard(txn)
                time.sleep(0.1)
            assert not pending, f"{len(pending)} acknowledged payments never became final"
        asyncio.run(check_effects_once(url, set(acked.values())))
    finally:
        restarted.stop()


async def count_unfinished(url: str) -> int:
    engine = create_async_engine(asyncpg_url(url))
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT count(*) FROM payments WHERE status NOT IN :final").bindparams(
                bindparam("final", expanding=True)
            ),
            {"final": sorted(FINAL)},
        )
        count = int(found.scalar_one())
    await engine.dispose()
    return count


async def check_effects_once(url: str, txns: set[str]) -> None:
    engine = create_async_engine(asyncpg_url(url))
    async with engine.connect() as conn:
        payments = (
            await conn.execute(text("SELECT transaction_id, amount_paise, status FROM payments"))
        ).all()
        assert {p.transaction_id for p in payments} == txns  # no payment twice, none lost
        finals = Counter(
            (
                await conn.execute(
                    text(
                        "SELECT transaction_id FROM payment_status_history WHERE status IN"
                        " ('SUCCESS','FAILED','BLOCKED','REVERSED')"
                    )
                )
            ).scalars()
        )
        assert set(finals) == txns and set(finals.values()) == {1}

        journal = {
            r.txn_id: r
            for r in (
                await conn.execute(
                    text(
                        "SELECT txn_id, debited, amount_paise, payer_vpa FROM npci_sim.transactions"
                    )
                )
            ).all()
        }
        assert set(journal) <= txns
        spent: dict[str, int] = defaultdict(int)
        for p in payments:
            debited = journal.get(p.transaction_id)
            if p.status == "SUCCESS":
                assert debited is not None and debited.debited, p.transaction_id
                spent[debited.payer_vpa] += p.amount_paise  # the engine's own is sealed
            else:
                assert debited is None or not debited.debited, p.transaction_id
        rows = await conn.execute(text("SELECT vpa, balance_paise FROM npci_sim.accounts"))
        balances = {vpa: balance for vpa, balance in rows.all()}
        for payer in PAYERS[:12]:
            if payer in balances:
                assert balances[payer] == opening_balance(payer) - spent[payer], payer

        events = Counter()
        for raw in (await conn.execute(text("SELECT envelope FROM outbox"))).scalars():
            env = Envelope.from_bytes(bytes(raw))
            events[(env.transaction_id, env.event_type)] += 1
        assert set(events.values()) == {1}, "an event was emitted twice"
        for txn in txns:
            terminal = [
                t
                for (x, t) in events
                if x == txn and t in ("PaymentSucceeded", "PaymentFailed", "PaymentBlocked")
            ]
            assert len(terminal) == 1, txn
            assert (txn, "FraudAssessed") in events, txn
        assert (await conn.execute(text("SELECT count(*) FROM dead_letters"))).scalar_one() == 0
    await engine.dispose()

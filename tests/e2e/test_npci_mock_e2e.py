"""``upi-engine npci-mock`` enforces NPCI's check-status rule over HTTP (SPEC §5): an early
and a fourth check-status get 429, counted in ``npci_mock_api_violations_total`` on its
``/metrics``; its journal of calls shows the timeline. NPCI's timetable runs a hundred times
as fast (``UPI_NPCI_TIME_SCALE`` 0.01: the 90 s are 0.9 s, the 2 hours 72 s). Its settlement
data is the same over HTTP as in process."""

from __future__ import annotations

import base64
import os
import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from api.switch_journal import SwitchSettlementJournal
from core.clock import business_date
from core.storage import Database
from npcisim.mock import MockSwitch
from payments.npci.http import HttpSwitch
from payments.npci.switch import PayRequest, RefundRequest, SettlementRecord
from settlement.domain import ItemKind
from tests.e2e.harness import Serve, base_env, cli
from tests.support import unique_name

pytestmark = pytest.mark.e2e


def _violations(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    m = re.search(r'^npci_mock_api_violations_total\{api="check_status"\} (\S+)$', text, re.M)
    assert m, text[-2000:]
    return float(m.group(1))


def test_the_mock_process_refuses_an_early_and_a_fourth_check_status(db_url):
    env = base_env(
        UPI_DATABASE_URL=db_url,
        UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        UPI_DATA_DIR="/tmp/unused-data-dir",
        UPI_NPCI_TIME_SCALE="0.01",
    )
    mock = Serve(env, ("npci-mock",)).start()
    try:
        assert _violations(mock.url) == 0
        with httpx.Client(base_url=mock.url, timeout=10) as client:
            paid = client.post(
                "/v1/pay",
                json={
                    "txn_id": "UPI-HTTP-1",
                    "payer_vpa": "success@okhdfc",
                    "payee_vpa": "shop@okicici",
                    "amount_paise": 100,
                },
            )
            assert paid.status_code == 200 and paid.json()["response_code"] == "00"

            early = client.get("/v1/transactions/UPI-HTTP-1")
            assert early.status_code == 429, early.text
            assert early.json()["reason"].startswith("too_early")
            assert "Retry-After" in early.headers

            calls = client.get("/v1/transactions/UPI-HTTP-1/calls").json()["calls"]
            pay_at = datetime.fromisoformat(calls[0]["at"])
            while datetime.now(pay_at.tzinfo) - pay_at < timedelta(seconds=0.9):
                time.sleep(0.05)
            for _ in range(3):
                answered = client.get("/v1/transactions/UPI-HTTP-1")
                assert answered.status_code == 200, answered.text
                assert answered.json()["response_code"] == "00"
            excess = client.get("/v1/transactions/UPI-HTTP-1")
            assert excess.status_code == 429, excess.text
            assert excess.json()["reason"].startswith("over_budget")

            calls = client.get("/v1/transactions/UPI-HTTP-1/calls").json()["calls"]
            assert [(c["api"], c["outcome"]) for c in calls] == [
                ("pay", "answered"),
                ("check_status", "too_early"),
                ("check_status", "answered"),
                ("check_status", "answered"),
                ("check_status", "answered"),
                ("check_status", "over_budget"),
            ]
        assert _violations(mock.url) == 2
    finally:
        mock.stop()


async def test_settlement_gets_the_same_journal_rows_in_process_and_over_http(pg_server, db_url):
    """The simulator's settlement data through the switch port: asked of ``npci-mock`` over
    HTTP, of the simulator in process on its database, and by the engine's CLI with
    ``UPI_NPCI_URL`` set (its own database holds none of those rows), the same rows. The
    ``npci-mock`` process, on a database of its own, makes only the simulator's tables."""
    name = unique_name("sim")
    admin = create_async_engine(pg_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    sim_url = pg_server.format(db=name)
    key = base64.b64encode(os.urandom(32)).decode()
    env = base_env(
        UPI_DATABASE_URL=sim_url,
        UPI_MASTER_KEY=key,
        UPI_DATA_DIR="/tmp/unused-data-dir",
        UPI_NPCI_TIME_SCALE="0.01",
    )
    mock = Serve(env, ("npci-mock",)).start()
    sim_db = Database(sim_url)
    http = HttpSwitch(mock.url)
    try:
        async with sim_db.connection() as conn:
            found = await conn.execute(
                text(
                    "SELECT table_schema || '.' || table_name FROM information_schema.tables"
                    " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
                    " ORDER BY 1"
                )
            )
            assert list(found.scalars()) == [
                "npci_sim.accounts",
                "npci_sim.api_calls",
                "npci_sim.disputes",
                "npci_sim.transactions",
                "public.schema_migrations",
            ]
        shop = "shop@okicici"
        paid = await http.pay(PayRequest("UPI-SD-1", "success@okhdfc", shop, 1_500))
        declined = await http.pay(PayRequest("UPI-SD-2", "insufficient@okhdfc", shop, 700))
        late = await http.pay(PayRequest("UPI-SD-3", "late-success@okaxis", shop, 900))
        assert (paid.response_code, declined.response_code, late.response_code) == (
            "00",
            "Z9",
            "U30",
        )
        refunded = await http.refund(
            RefundRequest("RFD-SD-1", "UPI-SD-1", "success@okhdfc", shop, 500)
        )
        assert refunded.response_code == "00"
        assert (await http.reverse("UPI-SD-VOID")).response_code == "21"  # never seen: void
        today = business_date(datetime.now(UTC))
        refs = ["UPI-SD-1", "UPI-SD-2", "UPI-SD-3", "RFD-SD-1", "UPI-SD-VOID", "UPI-SD-NONE"]

        over_http = await SwitchSettlementJournal(http).rows(today, refs)
        in_process = await SwitchSettlementJournal(MockSwitch(sim_db)).rows(today, refs)
        assert over_http == in_process
        assert [(r.reference, r.kind, r.amount_paise, r.debited) for r in over_http] == [
            ("RFD-SD-1", ItemKind.REFUND, 500, True),
            ("UPI-SD-1", ItemKind.PAYMENT, 1_500, True),
            ("UPI-SD-2", ItemKind.PAYMENT, 700, False),
            ("UPI-SD-3", ItemKind.PAYMENT, 900, True),  # a late success shows today
            ("UPI-SD-VOID", ItemKind.PAYMENT, 1, False),
        ]
        assert await http.settlement_data(today, refs) == await MockSwitch(sim_db).settlement_data(
            today, refs
        )
        # Another date: only what the references name.
        other = today - timedelta(days=3)
        assert [r.reference for r in await SwitchSettlementJournal(http).rows(other, [])] == []

        # The engine's CLI, on a database of its own, asks the switch at UPI_NPCI_URL.
        engine_env = {**env, "UPI_DATABASE_URL": db_url, "UPI_NPCI_URL": mock.url}
        args = ["settlement", "switch-data", "--business-date", today.isoformat()]
        done = cli(engine_env, *args, *(a for ref in refs for a in ("--ref", ref)))
        assert done.returncode == 0, done.stderr
        rows = orjson.loads(done.stdout)["rows"]
        assert [SettlementRecord(**r) for r in rows] == await http.settlement_data(today, refs)
    finally:
        await http.close()
        await sim_db.close()
        mock.stop()

"""Settlement through the real command and the operator API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from core.clock import business_date
from tests.e2e.harness import cli, create_merchant, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_settlement_run_cli_and_operator_api(embedded_env, tmp_path):
    today_ist = business_date(datetime.now(UTC))
    yesterday = (today_ist - timedelta(days=1)).isoformat()
    with serving(embedded_env, ("all",)) as (server,), httpx.Client(base_url=server.url) as client:
        merchant = create_merchant(embedded_env)
        operator = json.loads(
            cli(embedded_env, "operator", "create", "--name", "Ops", "--json").stdout
        )
        o_headers = {"Authorization": f"Bearer {operator['token']}"}
        assert (
            client.get(f"/v1/settlements/{yesterday}", headers=o_headers).json()["code"]
            == "not_found"
        )

        first = cli(
            embedded_env,
            "settlement",
            "run",
            "--business-date",
            yesterday,
            "--out",
            str(tmp_path),
            "--json",
        )
        assert first.returncode == 0, first.stderr
        summary = json.loads(first.stdout)
        assert summary["closed_now"] is True and summary["interbank_nets_sum_paise"] == 0
        assert summary["tat"] == {
            "breaches": 0,
            "reversed_late": 0,
            "open": 0,
            "days_late": 0,
            "compensation_paise": 0,
        }
        files = sorted(p.name for p in (tmp_path / yesterday).iterdir())
        assert files == [
            "interbank_net.csv",
            "merchant_payouts.csv",
            "reconciliation.csv",
            "summary.json",
            "tat_compensation.csv",
        ]
        before = {n: (tmp_path / yesterday / n).read_bytes() for n in files}
        again = cli(
            embedded_env,
            "settlement",
            "run",
            "--business-date",
            yesterday,
            "--out",
            str(tmp_path),
            "--json",
        )
        assert json.loads(again.stdout)["closed_now"] is False
        assert before == {n: (tmp_path / yesterday / n).read_bytes() for n in files}

        r = client.get(f"/v1/settlements/{yesterday}", headers=o_headers)
        assert r.status_code == 200 and r.json()["business_date"] == yesterday
        m_headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        assert client.get(f"/v1/settlements/{yesterday}", headers=m_headers).status_code == 403

        # The DR view of a single embedded database: a primary with no standby, no failover.
        dr = client.get("/v1/dr/status", headers=o_headers)
        assert dr.status_code == 200, dr.text
        assert dr.json()["database_role"] == "primary" and dr.json()["standbys"] == []
        assert dr.json()["last_failover"] is None and dr.json()["orchestrator"] is None
        assert client.get("/v1/dr/status", headers=m_headers).status_code == 403
        status = cli(embedded_env, "dr", "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["database_role"] == "primary"

    today = cli(embedded_env, "settlement", "run", "--business-date", today_ist.isoformat())
    assert today.returncode == 2 and "not over yet" in today.stderr
    bad = cli(embedded_env, "settlement", "run", "--business-date", "2026-13-45")
    assert bad.returncode == 2 and "--business-date" in bad.stderr

"""A merchant's payment, end to end, against real `upi-engine serve` processes.

Both modes run the same test: embedded (one process, in-process bus, embedded PostgreSQL)
and distributed (gateway, relay and switch as separate processes over the Tansu broker
and PostgreSQL)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.harness import cli, create_merchant, serving, wait_final

pytestmark = pytest.mark.e2e

MODES = {
    "embedded": (("all",),),
    "distributed": (("gateway",), ("relay",), ("fraud",), ("switch",)),
}


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    name = request.param
    env = request.getfixturevalue(f"{name}_env")
    return name, env


@pytest.mark.slow
def test_payment_reaches_its_final_status_in_both_modes(mode):
    name, env = mode
    with serving(env, *MODES[name]) as servers:
        merchant = create_merchant(env)
        gateway = servers[0]
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            results = {}
            for payer, amount in [("success@okhdfc", 12_345), ("insufficient@oksbi", 500)]:
                r = client.post(
                    "/v1/payments",
                    headers={**headers, "Idempotency-Key": f"key-{payer}"},
                    json={"payer_vpa": payer, "amount_paise": amount, "merchant_order_id": "ord-1"},
                )
                assert r.status_code == 202, r.text
                assert r.json()["status"] == "INITIATED"
                results[payer] = wait_final(client, r.json()["transaction_id"], headers)

            ok = results["success@okhdfc"]
            assert (ok["status"], ok["response_code"]) == ("SUCCESS", "00")
            assert ok["rrn"] and len(ok["rrn"]) == 12
            assert ok["payer_vpa"] == "su***ss@okhdfc" and ok["payee_vpa"] == "s***@okicici"
            assert ok["amount_paise"] == 12_345 and ok["completed_at"]
            bad = results["insufficient@oksbi"]
            assert (bad["status"], bad["response_code"]) == ("FAILED", "Z9")

            listed = client.get(
                "/v1/payments", params={"merchant_order_id": "ord-1"}, headers=headers
            )
            assert {p["transaction_id"] for p in listed.json()["items"]} == {
                ok["transaction_id"],
                bad["transaction_id"],
            }
            metrics = client.get("/metrics").text
            assert "upi_payments_initiated_total 2.0" in metrics

        # Operational endpoints answer on every role's process.
        for server in servers:
            assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
            assert "upi_" in httpx.get(f"{server.url}/metrics").text
        # The JSON logs carry the transaction id and never a clear VPA.
        logs = "\n".join(s.log.read_text() for s in servers)
        assert ok["transaction_id"] in logs
        assert "success@okhdfc" not in logs and "insufficient@oksbi" not in logs


def test_db_url_prints_the_database_in_use(embedded_env):
    not_running = cli(embedded_env, "db", "url")
    assert not_running.returncode == 1 and "not running" in not_running.stderr
    with serving(embedded_env, ("all",)):
        done = cli(embedded_env, "db", "url")
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url.startswith("postgresql://") and embedded_env["UPI_DATA_DIR"] in url


def test_auth_failures_are_problems(embedded_env):
    with (
        serving(embedded_env, ("all",)) as (server,),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        body = {"payer_vpa": "success@okhdfc", "amount_paise": 1, "merchant_order_id": "o"}
        r = client.post("/v1/payments", json=body, headers={"Idempotency-Key": "k"})
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "unauthenticated"
        r = client.post(
            "/v1/payments",
            json=body,
            headers={"Idempotency-Key": "k", "Authorization": "Bearer upi_sk_wrong"},
        )
        assert r.status_code == 401

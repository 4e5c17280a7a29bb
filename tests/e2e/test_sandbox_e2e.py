"""Each sandbox payer of SPEC §5 ends as the spec says, in both modes: embedded (in-process
mock switch) and distributed (gateway, relay, switch processes over Tansu, with the mock
switch as its own `upi-engine npci-mock` process)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.harness import Serve, create_merchant, serving, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SANDBOX = {
    "success": ("SUCCESS", "00"),
    "insufficient": ("FAILED", "Z9"),
    "wrongpin": ("FAILED", "ZM"),
    "bank-down": ("FAILED", "XY"),
    "timeout-success": ("SUCCESS", "00"),
    "timeout-failure": ("FAILED", "U30"),
}
# NPCI's timetable ten times as fast, in the engine and in the mock switch alike: the pay
# leg in 1.5 s, the first check-status 9 s after it (NPCI's 90 s, which the mock enforces).
SCALED_TIMINGS = {"UPI_NPCI_TIME_SCALE": "0.1"}


def run_sandbox(
    env: dict[str, str], *role_sets: tuple[str, ...], mock_url: str | None = None
) -> None:
    with serving(env, *role_sets) as servers:
        merchant = create_merchant(env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        with httpx.Client(base_url=servers[0].url, timeout=10) as client:
            txns = {}
            for i, (local, _) in enumerate(SANDBOX.items()):
                handle = ["okhdfc", "okicici", "oksbi", "okaxis", "ybl", "paytm"][i]
                r = client.post(
                    "/v1/payments",
                    headers={**headers, "Idempotency-Key": f"sandbox-{local}"},
                    json={
                        "payer_vpa": f"{local}@{handle}",
                        "amount_paise": 2_500,
                        "merchant_order_id": f"sb-{local}",
                    },
                )
                assert r.status_code == 202, r.text
                txns[local] = r.json()["transaction_id"]
            for local, (status, code) in SANDBOX.items():
                body = wait_final(client, txns[local], headers, timeout=40)
                assert (body["status"], body["response_code"]) == (status, code), local
            if mock_url:
                # Faults injected into the mock process reach payments: the switch role
                # really talks to it over HTTP.
                down = httpx.put(f"{mock_url}/v1/faults/HDFC", json={"down": True})
                assert down.status_code == 200 and down.json()["down"] is True
                r = client.post(
                    "/v1/payments",
                    headers={**headers, "Idempotency-Key": "ordinary-hdfc"},
                    json={
                        "payer_vpa": "ravi.kumar@okhdfc",
                        "amount_paise": 100,
                        "merchant_order_id": "sb-ordinary",
                    },
                )
                body = wait_final(client, r.json()["transaction_id"], headers)
                assert (body["status"], body["response_code"]) == ("FAILED", "XY")
                # The engine asked about its deemed payments over HTTP within NPCI's budget:
                # the mock process refused none.
                text = httpx.get(f"{mock_url}/metrics").text
                assert 'npci_mock_api_violations_total{api="check_status"} 0.0' in text


def test_sandbox_payers_embedded(embedded_env):
    run_sandbox({**embedded_env, **SCALED_TIMINGS}, ("all",))


def test_sandbox_payers_distributed_with_the_mock_switch_as_its_own_process(distributed_env):
    env = {**distributed_env, **SCALED_TIMINGS}
    mock = Serve(env, ("npci-mock",)).start()
    try:
        run_sandbox(
            {**env, "UPI_NPCI_URL": mock.url},
            ("gateway",),
            ("relay",),
            ("fraud",),
            ("switch",),
            mock_url=mock.url,
        )
    finally:
        mock.stop()

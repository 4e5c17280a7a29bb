"""``/metrics`` carries the operator's gauges of SPEC §10: consumer lag, batch sizes, the
deemed backlog, the checkpoint's age, switch latency and breaker state by bank (issue 17)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.harness import create_merchant, serving, wait_final

pytestmark = pytest.mark.e2e

# A payment that times out at the switch stays DEEMED until check-status, asked late here
# (one check, 30 min after the pay leg at NPCI's pace: 3 min at this scale; the pay leg 1.5 s).
DEEMED_FOR_A_WHILE = {"UPI_NPCI_TIME_SCALE": "0.1", "UPI_NPCI_CHECK_STATUS_PLAN_S": "[1800]"}


def _samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric's samples."""
    found = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            found[m.group(1) or ""] = float(m.group(2))
    return found


def _labelled(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """One metric's samples with their labels parsed (their order in the text varies)."""
    return [
        (dict(re.findall(r'(\w+)="([^"]*)"', labels)), value)
        for labels, value in _samples(text, name).items()
    ]


def _metrics_until(url: str, ok, timeout: float = 30) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if ok(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"/metrics never showed it:\n{text[-3000:]}")


def test_lag_batches_deemed_backlog_and_checkpoint_age(embedded_env):
    env = {**embedded_env, **DEEMED_FOR_A_WHILE}
    with serving(env, ("all",)) as [serve]:
        merchant = create_merchant(env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        with httpx.Client(base_url=serve.url, timeout=10) as client:
            txns = []
            for i in range(10):
                r = client.post(
                    "/v1/payments",
                    headers={**headers, "Idempotency-Key": f"m{i}"},
                    json={
                        "payer_vpa": f"success@{['okhdfc', 'oksbi'][i % 2]}",
                        "amount_paise": 500 + i,
                        "merchant_order_id": f"m{i}",
                    },
                )
                assert r.status_code == 202, r.text
                txns.append(r.json()["transaction_id"])
            r = client.post(
                "/v1/payments",
                headers={**headers, "Idempotency-Key": "deemed"},
                json={
                    "payer_vpa": "timeout-success@okaxis",
                    "amount_paise": 700,
                    "merchant_order_id": "deemed",
                },
            )
            assert r.status_code == 202, r.text
            for txn in txns:
                wait_final(client, txn, headers)

        # The deemed payment shows in the backlog, while the others have all been settled:
        # every consumer's lag is back to 0.
        def settled_with_one_deemed(text: str) -> bool:
            lags = _samples(text, "upi_consumer_lag")
            deemed = _samples(text, "upi_deemed_payments")
            return bool(lags) and set(lags.values()) == {0.0} and deemed.get("") == 1.0

        text = _metrics_until(serve.url, settled_with_one_deemed)
        lags = _samples(text, "upi_consumer_lag")
        for consumer in ("fraud-assessor", "npci-handler", "ledger", "settlement", "webhooks"):
            assert f'{{consumer="{consumer}"}}' in lags, sorted(lags)
        batches = _samples(text, "upi_consumer_batch_size_count")
        assert batches['{consumer="fraud-assessor"}'] >= 1
        sizes = _samples(text, "upi_consumer_batch_size_sum")
        # 11 payments' events went through the fraud assessor, in however many deliveries.
        assert sizes['{consumer="fraud-assessor"}'] >= 11
        age = _samples(text, "upi_ledger_checkpoint_age_seconds")
        assert "" in age and 0.0 <= age[""] < 60
        # The in-process mock switch's count of refused calls is on the engine's /metrics.
        violations = _samples(text, "npci_mock_api_violations_total")
        assert violations == {'{api="check_status"}': 0.0}
        # No payment is past RBI's TAT (the deemed one was sent seconds ago).
        assert _samples(text, "upi_tat_breaches") == {"": 0.0}
        # Switch latency by the payer's bank: 5 pay calls each to HDFC and SBI, and the
        # one to AXIS that timed out (observed too: it is how long the engine waited).
        calls = {
            (labels["operation"], labels["bank"]): n
            for labels, n in _labelled(text, "upi_switch_latency_seconds_count")
        }
        assert calls == {("pay", "HDFC"): 5, ("pay", "SBI"): 5, ("pay", "AXIS"): 1}, calls
        # Breaker state by bank: every bank used is closed (one timeout opens nothing).
        breakers = _samples(text, "upi_switch_breaker_state")
        assert breakers == {
            '{bank="HDFC"}': 0.0,
            '{bank="SBI"}': 0.0,
            '{bank="AXIS"}': 0.0,
        }, breakers

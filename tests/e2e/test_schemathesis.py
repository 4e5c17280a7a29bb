"""Schemathesis against the live /openapi.json: no 5xx, no response that breaks its own
schema, every status and content type documented, methods answered as declared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import create_merchant, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
# A schema-valid payment can still be refused by a rule no schema can state: a payee_vpa
# that is not one of the merchant's registered VPAs (422 payee_not_allowed), an amount over
# the merchant category's limit (422 amount_over_limit). Those 422s are the contract too.
CONFIG = """
[[operations]]
include-path = "/v1/payments"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]
"""


def test_the_live_api_keeps_its_own_openapi_contract(embedded_env, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {
        **embedded_env,
        # Let generated traffic reach the code rather than the limits.
        "UPI_MERCHANT_RATE_PER_S": "100000",
        "UPI_MERCHANT_RATE_BURST": "100000",
        "UPI_MERCHANT_READ_RATE_PER_S": "100000",
        "UPI_MERCHANT_READ_RATE_BURST": "100000",
        "UPI_AUTH_FAILURE_RATE_PER_S": "100000",
        "UPI_AUTH_FAILURE_BURST": "100000",
        "UPI_PAYER_DAILY_MAX_COUNT": "1000000",
        "UPI_PAYER_DAILY_MAX_AMOUNT_PAISE": "1000000000000",
    }
    with serving(env, ("all",)) as (server,):
        merchant = create_merchant(env)
        done = subprocess.run(
            [
                SCHEMATHESIS,
                "--config-file",
                str(config),
                "run",
                f"{server.url}/openapi.json",
                "-H",
                f"Authorization: Bearer {merchant['api_key']}",
                "-H",
                "Idempotency-Key: schemathesis-key",
                "--checks",
                "all",
                "--max-examples",
                "40",
                "--seed",
                "20261125",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-6000:]
        assert '"level":"ERROR"' not in server.log.read_text(), "the server logged an error"

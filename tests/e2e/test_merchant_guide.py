"""The merchant guide's examples work as written against a live engine."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import create_merchant, serving

pytestmark = pytest.mark.e2e

GUIDE = (Path(__file__).parents[2] / "docs" / "merchant-guide.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, flags=re.S)


def test_python_examples_run_as_written(embedded_env):
    verify_src, client_src = blocks("python")
    namespace: dict = {}
    exec(verify_src, namespace)
    body = b'{"status":"SUCCESS"}'
    verify = namespace["verify"]
    now = str(int(time.time()))

    def signed(secret: bytes, at: str) -> str:
        return "sha256=" + hmac.new(secret, at.encode() + b"." + body, hashlib.sha256).hexdigest()

    good = signed(b"whsec_x", now)
    assert verify(body, now, good, "whsec_x")
    assert not verify(body + b" ", now, good, "whsec_x")
    assert verify(body, now, f"{signed(b'whsec_new', now)}, {good}", "whsec_x")  # rotation
    stale = str(int(time.time()) - 600)
    assert not verify(body, stale, signed(b"whsec_x", stale), "whsec_x")  # a replay

    with serving(embedded_env, ("all",)) as (server,):
        merchant = create_merchant(embedded_env)
        source = client_src.replace('"upi_sk_…"', repr(merchant["api_key"])).replace(
            '"http://127.0.0.1:8000"', repr(server.url)
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(source, {})
        first, second = printed.getvalue().splitlines()
        status, code, rrn = first.split()
        assert (status, code, len(rrn)) == ("SUCCESS", "00", 12)
        assert second == "202 PENDING duplicate"


def test_curl_examples_run_as_written(embedded_env):
    curls = [
        b for b in blocks("sh") if b.lstrip().startswith("curl -s -X POST") and "/refunds" not in b
    ]
    with serving(embedded_env, ("all",)) as (server,):
        merchant = create_merchant(embedded_env)
        script = curls[0].replace("http://127.0.0.1:8000", server.url)
        done = subprocess.run(
            ["bash", "-c", script],
            env={**embedded_env, "API_KEY": merchant["api_key"]},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        created = json.loads(done.stdout)
        assert created["status"] == "INITIATED" and created["amount_paise"] == 12345

        # The step-up example: a payment the fraud engine wants verified, then the curl.

        import httpx

        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        stepped = httpx.post(
            f"{server.url}/v1/payments",
            json={
                "payer_vpa": "fraud-stepup@okhdfc",
                "amount_paise": 500,
                "merchant_order_id": "s",
            },
            headers={**headers, "Idempotency-Key": "guide-stepup"},
        ).json()["transaction_id"]
        deadline = time.monotonic() + 30
        while (
            httpx.get(f"{server.url}/v1/payments/{stepped}", headers=headers).json()["status"]
            != "PENDING_VERIFICATION"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        verification = next(c for c in curls if "/verification" in c)
        done = subprocess.run(
            ["bash", "-c", verification.replace("http://127.0.0.1:8000", server.url)],
            env={**embedded_env, "API_KEY": merchant["api_key"], "TXN": stepped},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(done.stdout)["transaction_id"] == stepped

        # The refund example, on the payment the first curl made, once it succeeded.
        deadline = time.monotonic() + 30
        txn = created["transaction_id"]
        while httpx.get(f"{server.url}/v1/payments/{txn}", headers=headers).json()["status"] != (
            "SUCCESS"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refund = next(b for b in blocks("sh") if "/refunds" in b)
        done = subprocess.run(
            ["bash", "-c", refund.replace("http://127.0.0.1:8000", server.url)],
            env={**embedded_env, "API_KEY": merchant["api_key"], "TXN": txn},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        made = json.loads(done.stdout[: done.stdout.index("}") + 1])
        assert (made["amount_paise"], made["reason"]) == (5000, "customer_request")

        # The disputes example: the sandbox payer who complains, then list and contest.
        disputed = httpx.post(
            f"{server.url}/v1/payments",
            json={"payer_vpa": "dispute@okhdfc", "amount_paise": 700, "merchant_order_id": "d"},
            headers={**headers, "Idempotency-Key": "guide-dispute"},
        ).json()["transaction_id"]
        deadline = time.monotonic() + 40
        while not (
            found := httpx.get(f"{server.url}/v1/disputes", headers=headers).json()["items"]
        ):
            assert time.monotonic() < deadline, "no dispute raised"
            time.sleep(0.2)
        [dispute] = found
        assert dispute["transaction_id"] == disputed
        example = next(b for b in blocks("sh") if "/v1/disputes" in b)
        done = subprocess.run(
            ["bash", "-c", example.replace("http://127.0.0.1:8000", server.url)],
            env={**embedded_env, "API_KEY": merchant["api_key"], "DISPUTE": dispute["dispute_id"]},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        listed, contested = (
            json.loads(line) for line in done.stdout.replace("}{", "}\n{").splitlines()
        )
        assert [d["dispute_id"] for d in listed["items"]] == [dispute["dispute_id"]]
        assert (contested["status"], contested["documents"]) == (
            "CONTESTED",
            ["INV-1001", "AWB-5550001"],
        )

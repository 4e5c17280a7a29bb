"""``UPI_ENV=production`` against the real ``upi-engine serve`` (SPEC §1): the sandbox's
mocks are refused at start, each with one line; with a switch of its own (the mock as its
own process, standing for NPCI) and an HTTP step-up provider (a tiny server here) it runs:
docs, OpenAPI and metrics only on the internal listener, and the sandbox payers are
ordinary payers, checked by the provider rather than by the mock OTP."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Serve, base_env, cli, create_merchant, query, wait_final
from tests.support import free_port

pytestmark = pytest.mark.e2e

CODE = "975310"  # the provider's code for every challenge; the mock OTP is not it


class StepUpProvider(BaseHTTPRequestHandler):
    """``POST /challenges`` records the challenge; ``POST /checks`` answers the verdict."""

    challenges: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/challenges":
            self.challenges.append(body)
            self._answer(202, {})
        elif self.path == "/checks":
            self.checks.append(body)
            self._answer(200, {"verified": body["code"] == CODE})
        else:
            self._answer(404, {})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StepUpProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _production(tmp_path, **extra: str) -> dict[str, str]:
    return base_env(UPI_DATA_DIR=str(tmp_path / "d"), UPI_ENV="production", **extra)


def _one_line(done) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_production_refuses_the_in_process_mock_switch(tmp_path):
    env = _production(
        tmp_path, UPI_INTERNAL_PORT=str(free_port()), UPI_VERIFICATION_URL="http://127.0.0.1:9"
    )
    line = _one_line(cli(env, "serve"))
    assert line.startswith("error: UPI_NPCI_URL:") and "mock switch" in line, line


def test_production_refuses_the_mock_otp(tmp_path):
    env = _production(tmp_path, UPI_INTERNAL_PORT=str(free_port()), UPI_NPCI_URL="http://x:9")
    line = _one_line(cli(env, "serve"))
    assert line.startswith("error: UPI_VERIFICATION_URL:") and "mock OTP" in line, line


def test_production_needs_the_internal_listener(tmp_path):
    env = _production(
        tmp_path, UPI_NPCI_URL="http://x:9", UPI_VERIFICATION_URL="http://127.0.0.1:9"
    )
    line = _one_line(cli(env, "serve"))
    assert line.startswith("error: UPI_INTERNAL_PORT:"), line


def test_production_refuses_plain_http_webhooks_and_private_addresses(tmp_path):
    env = _production(tmp_path)
    line = _one_line(
        cli(
            env,
            *("merchant", "create", "--name", "Shop", "--vpa", "shop@okicici"),
            *("--webhook-url", "http://shop.example/hooks"),
        )
    )
    assert line == "error: --webhook-url: must be an https:// URL with UPI_ENV=production", line
    line = _one_line(cli({**env, "UPI_WEBHOOK_ALLOW_PRIVATE": "true"}, "serve"))
    assert line.startswith("error: UPI_WEBHOOK_ALLOW_PRIVATE:") and "private" in line, line


# Two HTTP processes: only the first has the internal listener, and its /metrics adds up both.
@pytest.mark.parametrize("processes", ["1", "2"])
def test_production_serves_with_its_own_switch_and_step_up_provider(db_url, provider, processes):
    StepUpProvider.challenges.clear()
    StepUpProvider.checks.clear()
    common = {
        "UPI_DATABASE_URL": db_url,
        "UPI_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "UPI_DATA_DIR": "/tmp/unused-data-dir",
    }
    switch = Serve(base_env(**common), ("npci-mock",)).start()  # the sandbox's simulator
    internal_port = free_port()
    env = base_env(
        **common,
        UPI_ENV="production",
        UPI_NPCI_URL=switch.url,
        UPI_VERIFICATION_URL=provider,
        UPI_INTERNAL_PORT=str(internal_port),
        # Every payer whose score is not a block is stepped up: the payments below go
        # through the provider, and a sandbox payer is decided by its score alone.
        UPI_FRAUD_STEP_UP_THRESHOLD="0",
        UPI_GATEWAY_PROCESSES=processes,
    )
    server = Serve(env)
    try:
        server.start()
        internal = f"http://127.0.0.1:{internal_port}"
        for path in ("/metrics", "/openapi.json", "/docs", "/redoc"):
            for _ in range(4):  # new connections: with two processes, both answer some
                public = httpx.get(f"{server.url}{path}", timeout=5)
                assert public.status_code == 404, (path, public.text)
            inside = httpx.get(f"{internal}{path}", timeout=5)
            assert inside.status_code == 200, (path, inside.text)
        assert "/v1/payments" in httpx.get(f"{internal}/openapi.json", timeout=5).json()["paths"]
        # The public port's metrics, the 404s just answered among them.
        metrics = httpx.get(f"{internal}/metrics", timeout=5).text
        assert (
            'upi_http_request_seconds_count{method="GET",route="unmatched",status="404"} 16.0'
            in metrics
        ), metrics[-3000:]
        for path in ("/healthz", "/readyz"):  # load balancers stay on the public port
            assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200

        merchant = create_merchant(env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        with httpx.Client(base_url=server.url, timeout=10) as client:
            paid = client.post(
                "/v1/payments",
                json={
                    "payer_vpa": "fraud-block@okhdfc",
                    "amount_paise": 500,
                    "merchant_order_id": "prod-order-1",
                },
                headers={**headers, "Idempotency-Key": "prod-1"},
            )
            assert paid.status_code == 202, paid.text
            txn = paid.json()["transaction_id"]
            body = client.get(f"/v1/payments/{txn}", headers=headers).json()
            while body["fraud"] is None:
                time.sleep(0.02)  # within the merchant's read rate limit
                body = client.get(f"/v1/payments/{txn}", headers=headers).json()
            # The sandbox would block it whatever its score; here its score decides.
            assert body["fraud"]["decision"] == "STEP_UP", body
            assert "SANDBOX_PAYER" not in body["fraud"]["reasons"], body
            assert body["status"] == "PENDING_VERIFICATION", body

            url = f"/v1/payments/{txn}/verification"
            mock_otp = client.post(url, json={"otp": "123456"}, headers=headers)
            assert mock_otp.status_code == 422, mock_otp.text
            assert mock_otp.json()["code"] == "verification_failed"
            ok = client.post(url, json={"otp": CODE}, headers=headers)
            assert ok.status_code == 202, ok.text
            final = wait_final(client, txn, headers)
            assert final["status"] == "SUCCESS", final

        assert [c["transaction_id"] for c in StepUpProvider.challenges] == [txn]
        assert StepUpProvider.challenges[0]["payer_vpa"] == "fraud-block@okhdfc"
        assert [c["code"] for c in StepUpProvider.checks] == ["123456", CODE]
        (attempts,) = query(
            env, f"SELECT attempts FROM payment_verifications WHERE transaction_id = '{txn}'"
        )[0]
        assert attempts == 1
        server.stop()  # SIGTERM stops the internal listener with the rest: a clean exit
        assert server.proc is not None and server.proc.returncode == 0, server.tail()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{internal}/metrics", timeout=5)
    finally:
        server.stop()
        switch.stop()

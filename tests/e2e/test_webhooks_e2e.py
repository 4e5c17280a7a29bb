"""Webhooks: signed as SPEC §4, retried with backoff, the schedule survives a SIGKILL,
dead-lettered after the last try and replayed by an operator."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.harness import Serve, cli, create_merchant, query, serving
from tests.support import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST_RETRIES = {"UPI_WEBHOOK_RETRY_BASE_S": "0.2", "UPI_WEBHOOK_RETRY_MAX_INTERVAL_S": "0.5"}
BODY = {"payer_vpa": "success@okhdfc", "amount_paise": 2_000, "merchant_order_id": "wh-1"}


def verify(body: bytes, timestamp: str, header: str, secret: str, tolerance_s: int = 300) -> bool:
    """As the merchant guide says: a fresh timestamp and one matching signature."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    message = timestamp.encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s.strip()) for s in header.split(","))


class Receiver:
    """A merchant's webhook endpoint that verifies the signature like the merchant guide."""

    def __init__(self) -> None:
        self.secret = ""
        self.also_accepts: list[str] = []  # other secrets it takes (a rotation)
        self.signatures: list[str] = []
        self.failures_left = 0
        self.healthy = True
        self.received: list[dict] = []
        self.attempts = 0
        self.bad_signatures = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                timestamp = self.headers.get("X-UPI-Timestamp", "")
                receiver.signatures.append(self.headers.get("X-UPI-Signature", ""))
                if not any(
                    verify(body, timestamp, self.headers.get("X-UPI-Signature", ""), secret)
                    for secret in [receiver.secret, *receiver.also_accepts]
                ):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                elif not receiver.healthy or receiver.failures_left > 0:
                    receiver.failures_left -= 1
                    self.send_response(500)
                else:
                    receiver.received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.url = f"http://127.0.0.1:{self.port}/hooks/upi"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, (
                f"got {len(self.received)} webhooks of {count}: "
                + ", ".join(str(h.get("event") or h.get("status")) for h in self.received)
            )
            time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def pay(server: Serve, merchant: dict, key: str, body: dict = BODY) -> str:
    r = httpx.post(
        f"{server.url}/v1/payments",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {merchant['api_key']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["transaction_id"])


def test_signed_webhook_retried_until_accepted(embedded_env, receiver):
    env = {**embedded_env, **FAST_RETRIES}
    with serving(env, ("all",)) as (server,):
        merchant = create_merchant(env, "shop@okicici", "--webhook-url", receiver.url)
        receiver.secret = merchant["webhook_secret"]
        receiver.failures_left = 2
        txn = pay(server, merchant, "wh-a")
        receiver.wait_for(1)
        [hook] = receiver.received
        assert hook["transaction_id"] == txn and hook["status"] == "SUCCESS"
        assert hook["response_code"] == "00" and hook["payer_vpa"] == "su***ss@okhdfc"
        assert receiver.bad_signatures == 0 and receiver.attempts == 3
        [(status, attempts)] = query(env, "SELECT status, attempts FROM webhook_deliveries")
        assert (status, attempts) == ("DELIVERED", 3)


def test_retry_schedule_survives_a_sigkill(embedded_env, receiver):
    env = {**embedded_env, **FAST_RETRIES}
    server = Serve(env).start()
    merchant = create_merchant(env, "shop@okicici", "--webhook-url", receiver.url)
    receiver.secret = merchant["webhook_secret"]
    receiver.healthy = False
    txn = pay(server, merchant, "wh-b")
    deadline = time.monotonic() + 20
    while receiver.attempts < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.kill()
    receiver.healthy = True
    restarted = Serve(env).start()
    try:
        receiver.wait_for(1)
        assert receiver.received[0]["transaction_id"] == txn
        [(status,)] = query(env, "SELECT status FROM webhook_deliveries")
        assert status == "DELIVERED"
    finally:
        restarted.stop()


def test_dead_lettered_after_the_last_try_then_replayed_by_an_operator(embedded_env, receiver):
    env = {**embedded_env, **FAST_RETRIES, "UPI_WEBHOOK_MAX_AGE_S": "1"}
    with serving(env, ("all",)) as (server,):
        merchant = create_merchant(env, "shop@okicici", "--webhook-url", receiver.url)
        receiver.secret = merchant["webhook_secret"]
        receiver.healthy = False
        txn = pay(server, merchant, "wh-c")
        deadline = time.monotonic() + 20
        while not query(env, "SELECT 1 FROM webhook_deliveries WHERE status = 'DEAD'"):
            assert time.monotonic() < deadline, "never dead-lettered"
            time.sleep(0.1)
        listed = json.loads(cli(env, "webhooks", "list", "--json").stdout)
        assert [d["transaction_id"] for d in listed["deliveries"]] == [txn]
        assert listed["deliveries"][0]["last_error"] == "HTTP 500"
        receiver.healthy = True
        replayed = cli(env, "webhooks", "replay", "--json")
        assert replayed.returncode == 0 and json.loads(replayed.stdout) == {"replayed": 1}
        receiver.wait_for(1)
        assert receiver.received[0]["transaction_id"] == txn


def test_a_url_resolving_to_loopback_is_refused_when_private_addresses_are_not_allowed(
    embedded_env, receiver
):
    """The sandbox allows the receiver on 127.0.0.1 by default; with
    UPI_WEBHOOK_ALLOW_PRIVATE=false, as production always is, ``localhost`` resolves to
    loopback and every attempt is refused before any request, retried as usual."""
    env = {**embedded_env, **FAST_RETRIES, "UPI_WEBHOOK_ALLOW_PRIVATE": "false"}
    with serving(env, ("all",)) as (server,):
        url = f"http://localhost:{receiver.port}/hooks/upi"
        merchant = create_merchant(env, "shop@okicici", "--webhook-url", url)
        receiver.secret = merchant["webhook_secret"]
        txn = pay(server, merchant, "wh-ssrf")
        deadline = time.monotonic() + 20
        while not query(env, "SELECT 1 FROM webhook_deliveries WHERE attempts >= 2"):
            assert time.monotonic() < deadline, "never attempted twice"
            time.sleep(0.1)
        listed = json.loads(cli(env, "webhooks", "list", "--status", "PENDING", "--json").stdout)
        [delivery] = listed["deliveries"]
        assert delivery["transaction_id"] == txn
        error = delivery["last_error"]
        assert error.startswith("refused: localhost resolves to ") and "(loopback)" in error, error
        assert receiver.attempts == 0

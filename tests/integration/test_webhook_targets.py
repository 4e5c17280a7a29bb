"""The webhook dispatcher's SSRF checks on the real PostgreSQL: every attempt resolves the
URL's host again, refuses internal addresses (a failed attempt, retried, its reason in
``last_error``), and sends to the address it checked with the name in ``Host``."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import httpx
import orjson
from sqlalchemy import text

from core.clock import FakeClock
from core.crypto import MasterKey
from core.storage import Database
from payments.merchants import Merchant, insert_merchant
from payments.webhooks import WebhookDispatcher, WebhookPolicy


class Capture(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(204)


async def _merchant(db: Database, key: MasterKey, url: str) -> None:
    async with db.transaction() as conn:
        await insert_merchant(
            conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", url), key.seal(b"s", b"mer_1")
        )


async def _due(db: Database, clock: FakeClock, url: str, n: int) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            text(
                "INSERT INTO webhook_deliveries (event_id, merchant_id, transaction_id, url,"
                " body, status, next_attempt_at, created_at) VALUES (gen_random_uuid(),"
                " 'mer_1', :t, :u, :b, 'PENDING', :at, :at)"
            ),
            {"t": f"UPI{n}", "u": url, "b": orjson.dumps({"n": n}), "at": clock.now()},
        )


async def _delivery(db: Database, n: int) -> tuple[str, int, str | None]:
    async with db.connection() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT status, attempts, last_error FROM webhook_deliveries"
                    " WHERE transaction_id = :t"
                ),
                {"t": f"UPI{n}"},
            )
        ).one()
    return row.status, row.attempts, row.last_error


async def test_each_attempt_resolves_again_and_refuses_an_internal_answer(db):
    """A name that answers a public address, then 127.0.0.1 (DNS rebinding): the first
    delivery goes to the public address it checked, with the name as Host; the second is
    refused before any request, retried later like any failure."""
    key = MasterKey(os.urandom(32))
    clock = FakeClock(datetime.now(UTC))
    url = "https://hooks.shop.example:8443/upi?k=1"
    await _merchant(db, key, url)
    answers = [["93.184.215.14"], ["127.0.0.1"]]
    asked: list[tuple[str, int]] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return answers.pop(0)

    capture = Capture()
    dispatcher = WebhookDispatcher(
        db, key, clock, WebhookPolicy(), transport=capture, resolver=rebinding
    )
    await _due(db, clock, url, 1)
    assert await dispatcher.run_once() == 1
    [sent] = capture.requests
    assert str(sent.url) == "https://93.184.215.14:8443/upi?k=1"
    assert sent.headers["Host"] == "hooks.shop.example:8443"
    assert sent.extensions["sni_hostname"] == "hooks.shop.example"
    assert (await _delivery(db, 1))[:2] == ("DELIVERED", 1)

    await _due(db, clock, url, 2)
    assert await dispatcher.run_once() == 1
    assert len(capture.requests) == 1  # nothing sent to 127.0.0.1
    status, attempts, error = await _delivery(db, 2)
    assert (status, attempts) == ("PENDING", 1)
    assert error is not None and "127.0.0.1 (loopback)" in error, error
    assert asked == [("hooks.shop.example", 8443)] * 2


async def test_private_addresses_only_where_allowed_and_https_in_production(db):
    key = MasterKey(os.urandom(32))
    clock = FakeClock(datetime.now(UTC))
    await _merchant(db, key, "http://127.0.0.1:9/hooks")

    async def local(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    capture = Capture()
    strict = WebhookDispatcher(db, key, clock, WebhookPolicy(), transport=capture, resolver=local)
    await _due(db, clock, "http://127.0.0.1:9/hooks", 1)
    await _due(db, clock, "http://receiver.internal/hooks", 2)
    assert await strict.run_once() == 2
    assert capture.requests == []
    assert "loopback" in ((await _delivery(db, 1))[2] or "")
    assert "10.1.2.3 (private)" in ((await _delivery(db, 2))[2] or "")

    sandbox = WebhookDispatcher(
        db, key, clock, WebhookPolicy(), transport=capture, resolver=local, allow_private=True
    )
    await _due(db, clock, "http://127.0.0.1:9/hooks", 3)
    assert await sandbox.run_once() == 1
    assert [str(r.url) for r in capture.requests] == ["http://127.0.0.1:9/hooks"]

    production = WebhookDispatcher(
        db, key, clock, WebhookPolicy(), transport=capture, resolver=local, production=True
    )
    await _due(db, clock, "http://shop.example/hooks", 4)
    assert await production.run_once() == 1
    assert len(capture.requests) == 1
    assert "https" in ((await _delivery(db, 4))[2] or "")

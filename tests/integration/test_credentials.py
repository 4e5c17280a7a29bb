"""Credentials on the real PostgreSQL: several per principal, rotation with a grace period,
revocation, expiry, last-used times, the migration of tokens issued before credentials; and
webhook secrets that rotate, with every live secret's signature on a timestamped message."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta

import httpx
import orjson
from sqlalchemy import text

from api.auth import (
    Role,
    TokenCache,
    authenticate,
    issue_token,
    list_credentials,
    revoke_credential,
    rotate_credentials,
)
from api.bootstrap import all_migrations
from core.clock import FakeClock
from core.crypto import MasterKey
from core.storage import Database, migrate
from payments.merchants import Merchant, insert_merchant, rotate_webhook_secret
from payments.webhooks import WebhookDispatcher, WebhookPolicy
from tests.support import empty_database


async def merchant_principal(db: Database, merchant_id: str = "mer_1") -> str:
    async with db.transaction() as conn:
        return await issue_token(
            conn, principal_id=merchant_id, role=Role.MERCHANT, name="Shop", merchant_id=merchant_id
        )


async def test_a_rotated_key_works_through_its_grace_period_then_stops(db):
    first = await merchant_principal(db)
    assert (await authenticate(db, first)).merchant_id == "mer_1"  # type: ignore[union-attr]
    now = datetime.now(UTC)
    async with db.transaction() as conn:
        _, second, ends = await rotate_credentials(
            conn, "mer_1", Role.MERCHANT, grace=timedelta(seconds=1.5), now=now
        )
    assert ends == now + timedelta(seconds=1.5)
    assert await authenticate(db, first) is not None
    assert await authenticate(db, second) is not None
    await asyncio.sleep(1.6)
    assert await authenticate(db, first) is None  # the grace period is over
    assert await authenticate(db, second) is not None
    async with db.connection() as conn:
        listed = await list_credentials(conn)
    statuses = sorted(c.status(datetime.now(UTC)) for c in listed)
    assert statuses == ["active", "expired"]
    assert {c.prefix for c in listed} == {first[:12], second[:12]}
    assert all(c.last_used_at is not None for c in listed)  # both were used


async def test_a_revoked_token_is_refused_within_the_cache_ttl(db):
    async with db.transaction() as conn:
        token = await issue_token(conn, principal_id="aud_1", role=Role.AUDITOR, name="Asha")
    cache = TokenCache(ttl_s=0.3)
    assert await authenticate(db, token, cache) is not None
    async with db.connection() as conn:
        [credential] = await list_credentials(conn)
    async with db.transaction() as conn:
        assert await revoke_credential(conn, credential.credential_id, datetime.now(UTC))
        assert not await revoke_credential(conn, credential.credential_id, datetime.now(UTC))
    await asyncio.sleep(0.35)
    assert await authenticate(db, token, cache) is None
    async with db.connection() as conn:
        [after] = await list_credentials(conn)
    assert after.status(datetime.now(UTC)) == "revoked"


async def test_tokens_issued_before_credentials_keep_working_after_the_migration(pg_server):
    db = await empty_database(pg_server, "c")
    try:
        migrations = all_migrations()
        cut = next(i for i, m in enumerate(migrations) if m.id == "api.0003_credentials")
        await migrate(db, migrations[:cut])
        old = "upi_au_" + "x" * 43
        async with db.transaction() as conn:
            await conn.execute(
                text(
                    "INSERT INTO principals (principal_id, role, name, token_hash)"
                    " VALUES ('aud_old', 'auditor', 'Old', :h)"
                ),
                {"h": hashlib.sha256(old.encode()).digest()},
            )
        await migrate(db, migrations)
        found = await authenticate(db, old)
        assert found is not None and found.principal_id == "aud_old"
        async with db.connection() as conn:
            [credential] = await list_credentials(conn)
            stored = (await conn.execute(text("SELECT token_hash FROM principals"))).scalar_one()
        assert credential.prefix == "upi_au_" and stored is None
    finally:
        await db.close()


class Capture(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(204)


def signs(request: httpx.Request, secret: str) -> bool:
    timestamp = request.headers["X-UPI-Timestamp"]
    message = timestamp.encode() + b"." + request.content
    expected = "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return expected in [s.strip() for s in request.headers["X-UPI-Signature"].split(",")]


async def test_webhook_secrets_rotate_with_both_signatures_through_the_grace_period(db):
    key = MasterKey(os.urandom(32))
    clock = FakeClock(datetime.now(UTC))
    old, new = "whsec_old", "whsec_new"
    async with db.transaction() as conn:
        await insert_merchant(
            conn,
            Merchant("mer_1", "Shop", "shop@okicici", "5411", "https://shop.example/hooks"),
            key.seal(old.encode(), b"mer_1"),
        )
    capture = Capture()

    async def public(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]  # shop.example, offline

    dispatcher = WebhookDispatcher(
        db, key, clock, WebhookPolicy(), transport=capture, secrets_ttl_s=0, resolver=public
    )

    async def deliver(n: int) -> httpx.Request:
        async with db.transaction() as conn:
            await conn.execute(
                text(
                    "INSERT INTO webhook_deliveries (event_id, merchant_id, transaction_id, url,"
                    " body, status, next_attempt_at, created_at) VALUES (gen_random_uuid(),"
                    " 'mer_1', :t, 'https://shop.example/hooks', :b, 'PENDING', :at, :at)"
                ),
                {"t": f"UPI{n}", "b": orjson.dumps({"n": n}), "at": clock.now()},
            )
        before = len(capture.requests)
        assert await dispatcher.run_once() == 1
        assert len(capture.requests) == before + 1
        return capture.requests[-1]

    first = await deliver(1)
    assert signs(first, old) and not signs(first, new)
    assert abs(int(first.headers["X-UPI-Timestamp"]) - clock.now().timestamp()) <= 1
    async with db.transaction() as conn:
        await rotate_webhook_secret(
            conn,
            "mer_1",
            key.seal(new.encode(), b"mer_1"),
            grace=timedelta(seconds=1),
            now=datetime.now(UTC),
        )
    during = await deliver(2)
    assert signs(during, new) and signs(during, old)
    assert during.headers["X-UPI-Signature"].count("sha256=") == 2
    await asyncio.sleep(1.1)
    after = await deliver(3)
    assert signs(after, new) and not signs(after, old)
    # A signature covers the timestamp: the same body under another time does not verify.
    forged = httpx.Request(
        "POST",
        "https://shop.example/hooks",
        content=after.content,
        headers={
            **after.headers,
            "X-UPI-Timestamp": str(int(after.headers["X-UPI-Timestamp"]) + 1),
        },
    )
    assert not signs(forged, new)
    await dispatcher._client.aclose()

"""Webhooks: on each final status the merchant's URL gets the payment JSON, signed.

``X-UPI-Signature: sha256=<hex HMAC-SHA256 of the body, key = webhook secret>`` (SPEC §4).
:class:`WebhookRecorder` turns final-status events into rows of ``webhook_deliveries`` (with
its inbox row, so a redelivered event does not notify twice); :class:`WebhookDispatcher`
sends due rows, retrying with exponential backoff and full jitter for up to 24 hours. The
schedule is those rows, so it survives restarts. After the last try a delivery is ``DEAD``;
an operator replays it with ``upi-engine webhooks replay``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy.engine import Row

from core.bus.base import Subscription
from core.clock import Clock
from core.crypto import MasterKey
from core.events import (
    CATALOGUE,
    Envelope,
    PaymentBlocked,
    PaymentFailed,
    PaymentReversed,
    PaymentSucceeded,
    Topic,
)
from core.inbox import claim_many
from core.polling import PollingWorker
from core.storage import Database, sql_text
from payments import repository
from payments.views import payment_view

__all__ = [
    "WebhookDispatcher",
    "WebhookPolicy",
    "WebhookRecorder",
    "replay_dead_webhooks",
    "sign",
]

_log = logging.getLogger(__name__)
_FINAL_EVENTS = frozenset(
    {PaymentSucceeded.name, PaymentFailed.name, PaymentBlocked.name, PaymentReversed.name}
)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class WebhookPolicy:
    retry_base_s: float = 10.0
    max_interval_s: float = 3600.0
    max_age_s: float = 86_400.0
    timeout_s: float = 5.0

    def next_delay(self, attempts: int) -> float:
        """Full jitter: uniform in [base, min(cap, base * 2^attempts)]."""
        cap = min(self.max_interval_s, self.retry_base_s * 2 ** min(attempts, 30))
        return random.uniform(self.retry_base_s, max(self.retry_base_s, cap))


class WebhookRecorder:
    consumer = "webhooks"

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=self.handle,
            batch_handler=self.record,
            event_types=_FINAL_EVENTS,
        )

    async def handle(self, envelope: Envelope) -> None:
        await self.record([envelope])

    async def record(self, envelopes: Sequence[Envelope]) -> None:
        """One delivery per final-status event of a merchant with a webhook URL, for a
        batch in one transaction (an event seen before is skipped)."""
        merchants = {}
        for envelope in envelopes:
            merchants[envelope.event_id] = getattr(CATALOGUE.decode(envelope), "merchant_id", "")
        async with self._db.transaction() as conn:
            fresh = await claim_many(conn, self.consumer, [e.event_id for e in envelopes])
            todo = [e for e in envelopes if e.event_id in fresh]
            if not todo:
                return
            urls = {
                row.merchant_id: row.webhook_url
                for row in await conn.execute(
                    _WEBHOOK_URLS, {"ms": sorted({merchants[e.event_id] for e in todo})}
                )
            }
            todo = [e for e in todo if urls.get(merchants[e.event_id])]
            payments = await repository.load_payments(conn, [e.transaction_id or "" for e in todo])
            rows = [(e, payments[e.transaction_id]) for e in todo if e.transaction_id in payments]
            if not rows:
                return
            now = self._clock.now()
            await conn.execute(
                _NEW_DELIVERIES,
                {
                    "e": [str(e.event_id) for e, _ in rows],
                    "m": [p.merchant_id for _, p in rows],
                    "t": [p.transaction_id for _, p in rows],
                    "u": [urls[p.merchant_id] for _, p in rows],
                    "b": [orjson.dumps(payment_view(p)) for _, p in rows],
                    "now": now,
                },
            )


_WEBHOOK_URLS = sql_text(
    "SELECT merchant_id, webhook_url FROM merchants"
    " WHERE merchant_id = ANY(CAST(:ms AS text[])) AND webhook_url IS NOT NULL"
)
_NEW_DELIVERIES = sql_text(
    "INSERT INTO webhook_deliveries (event_id, merchant_id, transaction_id, url, body, status,"
    " next_attempt_at, created_at)"
    " SELECT e, m, t, u, b, 'PENDING', :now, :now FROM unnest(CAST(:e AS uuid[]),"
    " CAST(:m AS text[]), CAST(:t AS text[]), CAST(:u AS text[]), CAST(:b AS bytea[]))"
    " AS x(e, m, t, u, b) ON CONFLICT (event_id) DO NOTHING"
)


# On its partial index (payments.0004).
DUE_DELIVERIES = sql_text(
    "SELECT id, merchant_id, transaction_id, event_id, url, body, attempts,"
    " created_at FROM webhook_deliveries WHERE status = 'PENDING'"
    " AND next_attempt_at <= :now ORDER BY next_attempt_at LIMIT :n"
    " FOR UPDATE SKIP LOCKED"
)


class WebhookDispatcher(PollingWorker):
    name = "webhook dispatcher"

    def __init__(
        self,
        db: Database,
        master_key: MasterKey,
        clock: Clock,
        policy: WebhookPolicy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval_s: float = 0.2,
    ) -> None:
        self._db = db
        self._key = master_key
        self._clock = clock
        self.policy = policy or WebhookPolicy()
        super().__init__(poll_interval_s)
        self._client = httpx.AsyncClient(timeout=self.policy.timeout_s, transport=transport)
        self._secrets: dict[str, str] = {}

    async def step(self) -> int:
        return await self.run_once()

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self._client.aclose()

    async def _secret(self, merchant_id: str) -> str:
        secret = self._secrets.get(merchant_id)
        if secret is None:
            async with self._db.connection() as conn:
                sealed = (
                    await conn.execute(
                        sql_text("SELECT webhook_secret_enc FROM merchants WHERE merchant_id = :m"),
                        {"m": merchant_id},
                    )
                ).scalar_one()
            secret = self._key.open(bytes(sealed), merchant_id.encode()).decode()
            self._secrets[merchant_id] = secret
        return secret

    async def run_once(self, batch: int = 50) -> int:
        now = self._clock.now()
        lease = now + timedelta(seconds=self.policy.timeout_s * 2 + 1)
        async with self._db.transaction() as conn:
            rows = (await conn.execute(DUE_DELIVERIES, {"now": now, "n": batch})).all()
            if rows:
                await conn.execute(
                    sql_text(
                        "UPDATE webhook_deliveries SET next_attempt_at = :l WHERE id = ANY(:ids)"
                    ),
                    {"l": lease, "ids": [r.id for r in rows]},
                )
        await asyncio.gather(*(self._deliver(r) for r in rows))
        return len(rows)

    async def _deliver(self, row: Row[Any]) -> None:
        body = bytes(row.body)
        merchant_id: str = row.merchant_id
        error: str | None = None
        try:
            response = await self._client.post(
                row.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "X-UPI-Signature": sign(await self._secret(merchant_id), body),
                    "X-UPI-Event-Id": str(row.event_id),
                    "User-Agent": "upi-engine-webhooks/1",
                },
            )
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        now = self._clock.now()
        attempts = int(row.attempts) + 1
        async with self._db.transaction() as conn:
            if error is None:
                await conn.execute(
                    sql_text(
                        "UPDATE webhook_deliveries SET status = 'DELIVERED', attempts = :a,"
                        " delivered_at = :now, last_error = NULL WHERE id = :id"
                    ),
                    {"a": attempts, "now": now, "id": row.id},
                )
                return
            age = (now - row.created_at).total_seconds()
            delay = self.policy.next_delay(attempts)
            dead = age + delay > self.policy.max_age_s
            await conn.execute(
                sql_text(
                    "UPDATE webhook_deliveries SET status = :s, attempts = :a, last_error = :e,"
                    " next_attempt_at = :next WHERE id = :id"
                ),
                {
                    "s": "DEAD" if dead else "PENDING",
                    "a": attempts,
                    "e": error[:500],
                    "next": now + timedelta(seconds=delay),
                    "id": row.id,
                },
            )
        _log.info(
            "webhook %s",
            "dead-lettered" if dead else "will retry",
            extra={"transaction_id": row.transaction_id, "attempts": attempts, "error": error},
        )


async def replay_dead_webhooks(
    db: Database, clock: Clock, *, merchant_id: str | None = None, delivery_id: int | None = None
) -> int:
    """Put dead deliveries back on the schedule, with a fresh 24-hour window."""
    now = clock.now()
    sql = (
        "UPDATE webhook_deliveries SET status = 'PENDING', attempts = 0, next_attempt_at = :now,"
        " created_at = :now WHERE status = 'DEAD'"
    )
    params: dict[str, object] = {"now": now}
    if merchant_id:
        sql += " AND merchant_id = :m"
        params["m"] = merchant_id
    if delivery_id is not None:
        sql += " AND id = :id"
        params["id"] = delivery_id
    async with db.transaction() as conn:
        result = await conn.execute(sql_text(sql + " RETURNING id"), params)
        return len(result.all())

"""Webhooks: on each final status the merchant's URL gets the payment JSON, signed; on each
change of a dispute, ``{"event": "dispute.<opened|accepted|contested|won|lost>", "dispute":
{...}}``.

``X-UPI-Timestamp: <unix seconds>`` and ``X-UPI-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>.<body>", key = webhook secret>`` (SPEC §4): receivers reject a stale timestamp,
so a captured webhook cannot be replayed. During a secret rotation the header carries one
``sha256=`` value per secret not expired, newest first, comma-separated; each attempt is
signed afresh. The dispatcher reads the merchant's secrets again after ``SECRETS_TTL_S``.
:class:`WebhookRecorder` turns final-status events into rows of ``webhook_deliveries`` (with
its inbox row, so a redelivered event does not notify twice); :class:`WebhookDispatcher`
sends due rows, retrying with exponential backoff and full jitter for up to 24 hours. The
schedule is those rows, so it survives restarts. After the last try a delivery is ``DEAD``;
an operator replays it with ``upi-engine webhooks replay``.

Every attempt checks its URL first (``payments/webhook_targets.py``): https in production,
and every address its host resolves to now public (SSRF); the request goes to the address
checked. A refused URL is a failed attempt like any other, its reason in ``last_error``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
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
    DisputeAccepted,
    DisputeContested,
    DisputeRaised,
    DisputeResolved,
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
from payments.disputes import dispute_views
from payments.views import payment_view
from payments.webhook_targets import (
    Resolver,
    WebhookTargetRefused,
    pin_target,
    system_resolver,
)

__all__ = [
    "WebhookDispatcher",
    "WebhookPolicy",
    "WebhookRecorder",
    "replay_dead_webhooks",
    "sign",
    "signature_header",
]

_log = logging.getLogger(__name__)
_FINAL_EVENTS = frozenset(
    {PaymentSucceeded.name, PaymentFailed.name, PaymentBlocked.name, PaymentReversed.name}
)
_DISPUTE_EVENTS = frozenset(
    {DisputeRaised.name, DisputeAccepted.name, DisputeContested.name, DisputeResolved.name}
)


def dispute_webhook(event: object, view: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The webhook name of a dispute event and its body: the dispute as that event left it."""
    match event:
        case DisputeRaised():
            name, status = "dispute.opened", "OPEN"
        case DisputeAccepted():
            name, status = "dispute.accepted", "ACCEPTED"
        case DisputeContested():
            name, status = "dispute.contested", "CONTESTED"
        case DisputeResolved():
            status = event.outcome.value
            name = "dispute." + status.lower()
        case _:
            raise TypeError(f"not a dispute event: {event!r}")
    body = {**view, "status": status, "chargeback": status in ("ACCEPTED", "LOST")}
    return name, {"event": name, "dispute": body}


SECRETS_TTL_S = 1.0  # a rotated or expired secret is used at most this long after


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """One ``sha256=`` signature of a webhook sent at ``timestamp`` (unix seconds)."""
    message = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    return ", ".join(sign(secret, timestamp, body) for secret in secrets)


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

    def __init__(self, db: Database, clock: Clock, *, master: MasterKey) -> None:
        """``master``: opens the payer of each payment, whose webhook shows it masked."""
        self._db = db
        self._clock = clock
        self._master = master

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=self.handle,
            batch_handler=self.record,
            event_types=_FINAL_EVENTS | _DISPUTE_EVENTS,
        )

    async def handle(self, envelope: Envelope) -> None:
        await self.record([envelope])

    async def record(self, envelopes: Sequence[Envelope]) -> None:
        """One delivery per final-status event of a merchant with a webhook URL, for a
        batch in one transaction (an event seen before is skipped)."""
        merchants = {}
        decoded = {}
        for envelope in envelopes:
            decoded[envelope.event_id] = event = CATALOGUE.decode(envelope)
            merchants[envelope.event_id] = getattr(event, "merchant_id", "")
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
            finals = [e for e in todo if e.event_type in _FINAL_EVENTS]
            payments = await repository.load_payments(
                conn, [e.transaction_id or "" for e in finals], self._master
            )
            rows = [
                (e, payments[e.transaction_id].merchant_id, orjson.dumps(payment_view(p)))
                for e in finals
                if e.transaction_id in payments and (p := payments[e.transaction_id])
            ]
            disputed = [e for e in todo if e.event_type in _DISPUTE_EVENTS]
            if disputed:
                views = await dispute_views(
                    conn, [getattr(decoded[e.event_id], "dispute_id", "") for e in disputed]
                )
                for e in disputed:
                    event = decoded[e.event_id]
                    view = views.get(getattr(event, "dispute_id", ""))
                    if view is not None:
                        _, body = dispute_webhook(event, view)
                        rows.append((e, merchants[e.event_id], orjson.dumps(body)))
            if not rows:
                return
            now = self._clock.now()
            await conn.execute(
                _NEW_DELIVERIES,
                {
                    "e": [str(e.event_id) for e, _, _ in rows],
                    "m": [m for _, m, _ in rows],
                    "t": [e.transaction_id or "" for e, _, _ in rows],
                    "u": [urls[m] for _, m, _ in rows],
                    "b": [b for _, _, b in rows],
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
        secrets_ttl_s: float = SECRETS_TTL_S,
        production: bool = False,
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._db = db
        self._key = master_key
        self._clock = clock
        self.policy = policy or WebhookPolicy()
        super().__init__(poll_interval_s)
        # No proxy from the environment: it would resolve the name again, past the check.
        self._client = httpx.AsyncClient(
            timeout=self.policy.timeout_s, transport=transport, trust_env=False
        )
        self._production = production
        self._allow_private = allow_private
        self._resolver = resolver
        self._secrets: dict[str, tuple[float, list[str]]] = {}
        self._secrets_ttl_s = secrets_ttl_s

    async def step(self) -> int:
        return await self.run_once()

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self._client.aclose()

    async def _secrets_of(self, merchant_id: str) -> list[str]:
        """The merchant's webhook secrets not expired, newest first (cached briefly)."""
        cached = self._secrets.get(merchant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self._db.connection() as conn:
            sealed = (
                await conn.execute(
                    sql_text(
                        "SELECT secret_enc FROM webhook_secrets WHERE merchant_id = :m"
                        " AND (expires_at IS NULL OR expires_at > now())"
                        " ORDER BY created_at DESC, secret_id DESC"
                    ),
                    {"m": merchant_id},
                )
            ).scalars()
            secrets = [self._key.open(bytes(s), merchant_id.encode()).decode() for s in sealed]
        self._secrets[merchant_id] = (time.monotonic() + self._secrets_ttl_s, secrets)
        return secrets

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
            timestamp = int(self._clock.now().timestamp())
            secrets = await self._secrets_of(merchant_id)
            target = await pin_target(
                row.url,
                production=self._production,
                allow_private=self._allow_private,
                resolver=self._resolver,
            )
            response = await self._client.post(
                target.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "X-UPI-Timestamp": str(timestamp),
                    "X-UPI-Signature": signature_header(secrets, timestamp, body),
                    "X-UPI-Event-Id": str(row.event_id),
                    "User-Agent": "upi-engine-webhooks/1",
                    **target.headers,
                },
                extensions=target.extensions,
            )
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except WebhookTargetRefused as exc:
            error = str(exc)
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

"""Merchants: who collects money, to which VPAs, under which category (MCC).

A merchant collects only into its registered VPAs (``merchant_vpas``): its own, registered
when it is created, and those an operator adds (``upi-engine merchant add-vpa``). One VPA
belongs to one merchant. Each registration is published as ``MerchantVpaRegistered`` in the
same transaction, so that settlement can check, with its own copy, that what it credits to
a merchant was paid into one of the merchant's VPAs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import NotFound, VpaTaken
from core.events import Envelope, MerchantVpaRegistered
from core.ids import new_event_id
from core.keyring import SealedColumn
from core.outbox import append_to_outbox
from core.pii import Vpa
from core.storage import sql_text

__all__ = [
    "Merchant",
    "add_webhook_secret",
    "insert_merchant",
    "load_merchant",
    "register_vpa",
    "rotate_webhook_secret",
]


# What the merchants' tables seal under the master key (core/keyring.py re-wraps them).
SEALED = (
    SealedColumn("merchants", "merchant_id", "webhook_secret_enc", "merchant_id"),
    SealedColumn("webhook_secrets", "secret_id", "secret_enc", "merchant_id"),
)


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str
    vpa: str
    mcc: str
    webhook_url: str | None


async def insert_merchant(
    conn: AsyncConnection,
    merchant: Merchant,
    webhook_secret_enc: bytes,
    *,
    at: datetime | None = None,
) -> None:
    """Create the merchant and register its own VPA (:class:`VpaTaken` if another merchant
    has it). Publishes the registration (outbox)."""
    await conn.execute(
        sql_text(
            "INSERT INTO merchants (merchant_id, name, vpa, mcc, webhook_url, webhook_secret_enc)"
            " VALUES (:id, :n, :v, :mcc, :url, :sec)"
        ),
        {
            "id": merchant.merchant_id,
            "n": merchant.name,
            "v": merchant.vpa,
            "mcc": merchant.mcc,
            "url": merchant.webhook_url,
            "sec": webhook_secret_enc,
        },
    )
    await add_webhook_secret(conn, merchant.merchant_id, webhook_secret_enc)
    await register_vpa(conn, merchant.merchant_id, Vpa(merchant.vpa), at=at)


async def add_webhook_secret(
    conn: AsyncConnection,
    merchant_id: str,
    secret_enc: bytes,
    *,
    expires_at: datetime | None = None,
) -> str:
    """A webhook secret of the merchant (sealed under the master key, AAD = merchant id);
    webhooks are signed with every secret not expired. Its id."""
    secret_id = "whs_" + new_event_id().hex[:20]
    await conn.execute(
        sql_text(
            "INSERT INTO webhook_secrets (secret_id, merchant_id, secret_enc, expires_at)"
            " VALUES (:s, :m, :e, :exp)"
        ),
        {"s": secret_id, "m": merchant_id, "e": secret_enc, "exp": expires_at},
    )
    return secret_id


async def rotate_webhook_secret(
    conn: AsyncConnection, merchant_id: str, secret_enc: bytes, *, grace: timedelta, now: datetime
) -> tuple[str, datetime]:
    """A new webhook secret; the merchant's others keep signing for ``grace`` (never longer
    than they already would), so receivers can switch over. (its id, when the others end)."""
    found = (
        await conn.execute(
            sql_text("SELECT 1 FROM merchants WHERE merchant_id = :m FOR UPDATE"),
            {"m": merchant_id},
        )
    ).first()
    if found is None:
        raise NotFound(f"no merchant {merchant_id}")
    ends = now + grace
    await conn.execute(
        sql_text(
            "UPDATE webhook_secrets SET expires_at = LEAST(coalesce(expires_at, :ends), :ends)"
            " WHERE merchant_id = :m AND (expires_at IS NULL OR expires_at > :now)"
        ),
        {"m": merchant_id, "ends": ends, "now": now},
    )
    secret_id = await add_webhook_secret(conn, merchant_id, secret_enc)
    return secret_id, ends


async def register_vpa(
    conn: AsyncConnection, merchant_id: str, vpa: Vpa, *, at: datetime | None = None
) -> bool:
    """Let the merchant collect into ``vpa``. True if newly registered, False if it already
    was this merchant's; :class:`VpaTaken` if it is another merchant's, :class:`NotFound`
    for an unknown merchant. Publishes the registration (outbox)."""
    at = at or datetime.now(UTC)
    # The merchant row is locked so that it cannot go away under the registration; a
    # concurrent registration of the same VPA waits on the primary key, then finds it.
    exists = (
        await conn.execute(
            sql_text("SELECT 1 FROM merchants WHERE merchant_id = :m FOR KEY SHARE"),
            {"m": merchant_id},
        )
    ).first()
    if exists is None:
        raise NotFound(f"no merchant {merchant_id}")
    inserted = (
        await conn.execute(
            sql_text(
                "INSERT INTO merchant_vpas (vpa, merchant_id, created_at) VALUES (:v, :m, :at)"
                " ON CONFLICT (vpa) DO NOTHING RETURNING 1"
            ),
            {"v": vpa.value, "m": merchant_id, "at": at},
        )
    ).first()
    if inserted is None:
        owner = (
            await conn.execute(
                sql_text("SELECT merchant_id FROM merchant_vpas WHERE vpa = :v"), {"v": vpa.value}
            )
        ).scalar_one()
        if owner != merchant_id:
            raise VpaTaken(f"{vpa} is already registered to another merchant")
        return False
    event = MerchantVpaRegistered(merchant_id=merchant_id, vpa=vpa, registered_at=at)
    await append_to_outbox(
        conn, [Envelope.wrap(event, partition_key=f"merchant:{merchant_id}", occurred_at=at)]
    )
    return True


async def load_merchant(conn: AsyncConnection, merchant_id: str) -> Merchant | None:
    row = (
        await conn.execute(
            sql_text(
                "SELECT merchant_id, name, vpa, mcc, webhook_url FROM merchants"
                " WHERE merchant_id = :id"
            ),
            {"id": merchant_id},
        )
    ).first()
    if row is None:
        return None
    return Merchant(row.merchant_id, row.name, row.vpa, row.mcc, row.webhook_url)

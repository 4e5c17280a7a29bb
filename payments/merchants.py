"""Merchants: who collects money, to which VPA, under which category (MCC)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from core.storage import sql_text

__all__ = ["Merchant", "insert_merchant", "load_merchant"]


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str
    vpa: str
    mcc: str
    webhook_url: str | None


async def insert_merchant(
    conn: AsyncConnection, merchant: Merchant, webhook_secret_enc: bytes
) -> None:
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

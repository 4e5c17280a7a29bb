"""Identifiers. Time-ordered (UUIDv7 layout) so that primary-key indexes stay append-mostly."""

from __future__ import annotations

import os
import secrets
import time
import uuid

__all__ = ["new_event_id", "new_merchant_id", "new_rrn", "new_token", "new_transaction_id"]


def _uuid7() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 64) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def new_event_id() -> uuid.UUID:
    return _uuid7()


def new_transaction_id() -> str:
    """Our transaction id, 35 chars: ``UPI`` + 32 hex, inside NPCI's 35-character txn id limit."""
    return "UPI" + _uuid7().hex


def new_merchant_id() -> str:
    return "mer_" + _uuid7().hex[:20]


def new_rrn() -> str:
    """A 12-digit retrieval reference number."""
    return f"{secrets.randbelow(10**12):012d}"


def new_token(prefix: str) -> str:
    """A bearer token: a readable prefix and 256 bits of randomness."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"

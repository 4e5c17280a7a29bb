"""Money is an ``int`` of paise end to end; ``Decimal`` only when rendering rupees."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import Field

__all__ = ["Paise", "PositivePaise", "paise_to_rupees"]

Paise = int
# Strict: a JSON float or string is refused rather than silently rounded.
PositivePaise = Annotated[int, Field(strict=True, ge=1)]


def paise_to_rupees(amount: Paise) -> Decimal:
    return (Decimal(amount) / 100).quantize(Decimal("0.01"))

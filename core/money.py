"""Money is an ``int`` of paise end to end; ``Decimal`` only when rendering rupees."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

__all__ = ["Paise", "PositivePaise", "WholePaise", "paise_to_rupees"]

Paise = int


def _whole_number(value: Any) -> Any:
    """A JSON number with no fractional part (``100`` or ``100.0``); never a string or a
    bool, and never rounded: ``100.5`` is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a whole number of paise (a JSON integer)")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("paise cannot have a fractional part")
    return int(value)


# Money as it arrives from outside (API bodies, events). Constraints go before the
# validator in an Annotated, so that they show in the JSON schema.
WholePaise = BeforeValidator(_whole_number)
PositivePaise = Annotated[int, Field(ge=1), WholePaise]


def paise_to_rupees(amount: Paise) -> Decimal:
    return (Decimal(amount) / 100).quantize(Decimal("0.01"))

"""Money is an ``int`` of paise end to end; ``Decimal`` only when rendering rupees."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

__all__ = ["Paise", "PositivePaise", "WholePaise", "format_rupees", "paise_to_rupees"]

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


def format_rupees(amount: Paise) -> str:
    """Rupees as India writes them: ``₹2,00,000``, ``₹1,23,456.78`` (lakh and crore groups;
    paise shown only when there are any)."""
    sign = "-" if amount < 0 else ""
    rupees, paise = divmod(abs(amount), 100)
    digits = str(rupees)
    head, tail = digits[:-3], digits[-3:]
    groups: list[str] = []
    while len(head) > 2:
        groups.insert(0, head[-2:])
        head = head[:-2]
    if head:
        groups.insert(0, head)
    whole = ",".join([*groups, tail])
    return f"{sign}₹{whole}" + (f".{paise:02d}" if paise else "")

"""Transaction limits: per transaction by merchant category (MCC), per payer per IST day.

NPCI's general UPI limit is ₹1,00,000 per transaction. Some categories carry a higher one:
capital markets, insurance, collections, foreign inward remittances (₹2,00,000); tax,
hospitals and education, IPO, RBI retail direct (₹5,00,000). The table is the default;
``UPI_MCC_LIMITS_PAISE`` (a JSON object ``{"mcc": paise}``) overrides or extends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.money import Paise

__all__ = ["DEFAULT_LIMIT_PAISE", "MCC_LIMITS_PAISE", "PayerDailyLimits", "per_transaction_limit"]

DEFAULT_LIMIT_PAISE: Paise = 1_00_000_00  # ₹1,00,000

MCC_LIMITS_PAISE: dict[str, Paise] = {
    "6211": 2_00_000_00,  # securities brokers / capital markets
    "6300": 2_00_000_00,  # insurance
    "7322": 2_00_000_00,  # collection agencies
    "9311": 5_00_000_00,  # tax payments
    "8062": 5_00_000_00,  # hospitals
    "8220": 5_00_000_00,  # colleges and universities
    "8299": 5_00_000_00,  # schools and educational services
}


def per_transaction_limit(mcc: str, overrides: Mapping[str, Paise] | None = None) -> Paise:
    if overrides and mcc in overrides:
        return overrides[mcc]
    return MCC_LIMITS_PAISE.get(mcc, DEFAULT_LIMIT_PAISE)


@dataclass(frozen=True)
class PayerDailyLimits:
    """Per payer VPA, per IST calendar day, counting payments that have not failed."""

    max_count: int = 20
    max_amount_paise: Paise = 1_00_000_00

"""Transaction limits: per transaction by merchant category, per payer per IST day.

NPCI's general UPI limit is ₹1,00,000 per transaction. Since 15 September 2025, as reported
(NPCI's circular of August 2025, summarised by NPCI on X and in the press, docs/npci.md),
verified merchants in some categories take more, with a daily cap per payer and category:

==================  =====================================  ==============  ==============
category            MCCs                                   per payment     per payer, day
==================  =====================================  ==============  ==============
capital_markets     6211                                   ₹5,00,000       ₹10,00,000
insurance           5960, 6300, 6381, 6399                 ₹5,00,000       ₹10,00,000
travel              3000-3350, 4112, 4511, 4722            ₹5,00,000       ₹10,00,000
tax                 9311                                   ₹5,00,000       ₹10,00,000
collections         7322                                   ₹5,00,000       ₹10,00,000
jewellery           5944                                   ₹2,00,000       ₹6,00,000
hospitals           8062                                   ₹5,00,000       ₹10,00,000
education           8211, 8220, 8299                       ₹5,00,000       ₹10,00,000
==================  =====================================  ==============  ==============

Every other MCC takes ₹1,00,000 per payment, and its payments count toward the payer's
general day (:class:`PayerDailyLimits`). The two days are separate: a payment in a category
counts toward that category's cap only, never toward the general daily amount, so a payer
who spent ₹90,000 at a grocer can still pay a ₹5,00,000 insurance premium that day, and the
premium does not use up the grocer's ₹1,00,000. The general daily *count* is the engine's
velocity guard and counts every payment, in a category or not.

"Verified merchants": the engine has no verification flag. A merchant's MCC is set by the
operator at onboarding (``upi-engine merchant create --mcc``), and that onboarding is the
verification: a merchant created with a category's MCC takes that category's limits.

Overrides: ``UPI_MCC_LIMITS_PAISE`` (JSON ``{"mcc": paise}``) sets the per-payment limit of
an MCC (it does not move the MCC into or out of a category);
``UPI_CATEGORY_DAILY_LIMITS_PAISE`` (JSON ``{"category": paise}``) sets a category's cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from core.errors import LimitExceeded
from core.money import Paise, format_rupees

__all__ = [
    "CATEGORIES",
    "DEFAULT_LIMIT_PAISE",
    "MCC_LIMITS_PAISE",
    "LimitCategory",
    "PayerDailyLimits",
    "PayerDay",
    "PaymentLimits",
    "category_of",
    "check_amount",
    "check_payer_day",
    "daily_override_problem",
    "per_transaction_limit",
]

DEFAULT_LIMIT_PAISE: Paise = 1_00_000_00  # ₹1,00,000

_LAKH: Paise = 1_00_000_00
_SEPT_2025 = "NPCI, effective 15 September 2025, as reported"
_EARLIER = "RBI December 2023 (₹5 lakh per payment), daily cap as reported in September 2025"


@dataclass(frozen=True)
class LimitCategory:
    """A merchant category with its own per-payment limit and per-payer daily cap."""

    name: str  # stable: the problem documents' ``category``, the override's key
    description: str
    mccs: frozenset[str]
    per_transaction_paise: Paise
    daily_paise: Paise  # per payer VPA, per IST calendar day, payments that have not failed
    source: str


def _mccs(*codes: str | range) -> frozenset[str]:
    out: set[str] = set()
    for code in codes:
        if isinstance(code, range):
            out.update(f"{c:04d}" for c in code)
        else:
            out.add(code)
    return frozenset(out)


CATEGORIES: tuple[LimitCategory, ...] = (
    LimitCategory(
        "capital_markets",
        "capital markets: securities brokers and dealers",
        _mccs("6211"),
        5 * _LAKH,
        10 * _LAKH,
        _SEPT_2025,
    ),
    LimitCategory(
        "insurance",
        "insurance: sales, underwriting and premiums",
        _mccs("5960", "6300", "6381", "6399"),
        5 * _LAKH,
        10 * _LAKH,
        _SEPT_2025,
    ),
    LimitCategory(
        "travel",
        "travel: airlines (3000-3350, 4511), passenger railways, travel agencies",
        _mccs(range(3000, 3351), "4112", "4511", "4722"),
        5 * _LAKH,
        10 * _LAKH,
        _SEPT_2025,
    ),
    LimitCategory(
        "tax",
        "tax payments (government e-marketplace and tax, as reported)",
        _mccs("9311"),
        5 * _LAKH,
        10 * _LAKH,
        _SEPT_2025,
    ),
    LimitCategory(
        "collections",
        "collections: loan repayments and EMIs through collection agencies",
        _mccs("7322"),
        5 * _LAKH,
        10 * _LAKH,
        _SEPT_2025,
    ),
    LimitCategory(
        "jewellery",
        "jewellery, watch and silverware stores",
        _mccs("5944"),
        2 * _LAKH,
        6 * _LAKH,
        _SEPT_2025,
    ),
    LimitCategory("hospitals", "hospitals", _mccs("8062"), 5 * _LAKH, 10 * _LAKH, _EARLIER),
    LimitCategory(
        "education",
        "schools, colleges and universities, educational services",
        _mccs("8211", "8220", "8299"),
        5 * _LAKH,
        10 * _LAKH,
        _EARLIER,
    ),
)

_BY_NAME: dict[str, LimitCategory] = {c.name: c for c in CATEGORIES}
_BY_MCC: dict[str, LimitCategory] = {m: c for c in CATEGORIES for m in c.mccs}
assert len(_BY_MCC) == sum(len(c.mccs) for c in CATEGORIES), "an MCC is in two categories"

# Per MCC, the per-payment limit of its category (the API's bound on ``amount_paise``).
MCC_LIMITS_PAISE: dict[str, Paise] = {m: c.per_transaction_paise for m, c in _BY_MCC.items()}


def category_of(mcc: str) -> LimitCategory | None:
    """The category an MCC belongs to; None: the general ₹1,00,000 and the general day."""
    return _BY_MCC.get(mcc)


def per_transaction_limit(mcc: str, overrides: Mapping[str, Paise] | None = None) -> Paise:
    if overrides and mcc in overrides:
        return overrides[mcc]
    return MCC_LIMITS_PAISE.get(mcc, DEFAULT_LIMIT_PAISE)


def daily_override_problem(overrides: Iterable[str]) -> str | None:
    """What is wrong with ``UPI_CATEGORY_DAILY_LIMITS_PAISE``'s keys, or None."""
    unknown = sorted(set(overrides) - set(_BY_NAME))
    if unknown:
        return f"unknown categories {unknown}; known: {sorted(_BY_NAME)}"
    return None


@dataclass(frozen=True)
class PayerDailyLimits:
    """The general day: per payer VPA, per IST calendar day, counting payments that have
    not failed. The count is over every payment; the amount over payments outside the
    categories, which have their own cap (:data:`CATEGORIES`)."""

    max_count: int = 20
    max_amount_paise: Paise = 1_00_000_00


@dataclass(frozen=True)
class PaymentLimits:
    mcc_overrides: Mapping[str, Paise] = field(default_factory=dict)
    category_daily_overrides: Mapping[str, Paise] = field(default_factory=dict)
    payer_daily: PayerDailyLimits = field(default_factory=PayerDailyLimits)

    def daily_cap(self, category: LimitCategory) -> Paise:
        return self.category_daily_overrides.get(category.name, category.daily_paise)


@dataclass(frozen=True)
class PayerDay:
    """A payer's payments today (IST) that have not failed, for one MCC."""

    count: int
    amount_paise: Paise


def _named(category: LimitCategory | None, mcc: str) -> str:
    return f"{category.name} (MCC {mcc})" if category else f"MCC {mcc}"


def _money(paise: Paise) -> str:
    return f"{format_rupees(paise)} ({paise} paise)"


def check_amount(mcc: str, amount_paise: Paise, limits: PaymentLimits) -> None:
    """Raise ``amount_over_limit`` if one payment is over its MCC's limit."""
    limit = per_transaction_limit(mcc, limits.mcc_overrides)
    if amount_paise > limit:
        category = category_of(mcc)
        raise LimitExceeded(
            "amount_over_limit",
            f"amount {_money(amount_paise)} is over the per-transaction limit of"
            f" {_money(limit)} for {_named(category, mcc)}",
            limit_paise=limit,
            category=category.name if category else None,
        )


def check_payer_day(
    day: Mapping[str, PayerDay], mcc: str, amount_paise: Paise, limits: PaymentLimits
) -> None:
    """Raise if a payment of ``amount_paise`` to a merchant with ``mcc`` would take the payer
    past a daily limit, given the payer's payments today by MCC (``day``). The caller holds
    the payer's lock, so ``day`` cannot change before this payment commits or rolls back."""
    general = limits.payer_daily
    if sum(d.count for d in day.values()) + 1 > general.max_count:
        raise LimitExceeded(
            "payer_daily_count_exceeded",
            f"the payer has reached {general.max_count} payments today (IST)",
            limit_count=general.max_count,
        )
    category = category_of(mcc)
    if category is None:
        spent = sum(d.amount_paise for m, d in day.items() if category_of(m) is None)
        if spent + amount_paise > general.max_amount_paise:
            raise LimitExceeded(
                "payer_daily_amount_exceeded",
                f"this payment would take the payer past the daily limit of"
                f" {_money(general.max_amount_paise)} today (IST)",
                limit_paise=general.max_amount_paise,
            )
        return
    cap = limits.daily_cap(category)
    spent = sum(d.amount_paise for m, d in day.items() if category_of(m) is category)
    if spent + amount_paise > cap:
        raise LimitExceeded(
            "payer_category_daily_amount_exceeded",
            f"this payment would take the payer past the daily limit of {_money(cap)}"
            f" for {category.name} today (IST)",
            limit_paise=cap,
            category=category.name,
        )

"""Settlement math, pure (no I/O): inter-bank net positions, merchant payouts, the
reconciliation of our records against the switch's journal, and of each payment's payee
against the VPAs registered to the merchant it is credited to.

All money is integer paise. Fees round half up once per merchant and business date:
``fee = round(gross * mdr_bps / 10_000)``, ``gst = round(fee * 18 / 100)``,
``net = gross - refunds - fee - gst``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

from core.clock import IST
from core.money import Paise

__all__ = [
    "GST_PERCENT",
    "BankPosition",
    "Item",
    "ItemKind",
    "JournalRow",
    "MerchantPayout",
    "Mismatch",
    "MismatchClass",
    "cycle_of",
    "interbank_positions",
    "merchant_payouts",
    "reconcile",
    "round_half_up",
    "withhold_unregistered_payees",
]

GST_PERCENT = 18
CYCLE_HOURS = 4  # six settlement cycles a day, by the IST time of the final status


class ItemKind(StrEnum):
    PAYMENT = "PAYMENT"  # a SUCCESS payment: payer bank pays the payee bank
    REFUND = "REFUND"  # a refund credit: the payee bank pays back the payer bank


@dataclass(frozen=True)
class Item:
    """One settled movement, as the gateway recorded it."""

    kind: ItemKind
    reference: str  # transaction id, or refund id
    transaction_id: str
    merchant_id: str
    mcc: str
    amount_paise: Paise
    payer_bank: str
    payee_bank: str
    final_at: datetime
    # The VPA the payment was paid into, or a stable stand-in for it (settlement keeps a
    # keyed pseudonym). None: not known (refunds; payments recorded before payees were).
    payee: str | None = None


def cycle_of(at: datetime) -> int:
    return at.astimezone(IST).hour // CYCLE_HOURS + 1


def round_half_up(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class BankPosition:
    bank: str
    debits_paise: Paise
    credits_paise: Paise

    @property
    def net_paise(self) -> Paise:
        return self.credits_paise - self.debits_paise


def interbank_positions(items: Iterable[Item]) -> list[BankPosition]:
    """Multilateral net: what each bank pays (debits) and receives (credits)."""
    debits: dict[str, int] = defaultdict(int)
    credits: dict[str, int] = defaultdict(int)
    for item in items:
        payer, payee = item.payer_bank, item.payee_bank
        if item.kind is ItemKind.REFUND:
            payer, payee = payee, payer  # money flows back to the payer's bank
        debits[payer] += item.amount_paise
        credits[payee] += item.amount_paise
    banks = sorted(set(debits) | set(credits))
    return [BankPosition(b, debits[b], credits[b]) for b in banks]


@dataclass(frozen=True)
class MerchantPayout:
    merchant_id: str
    gross_paise: Paise
    refunds_paise: Paise
    fee_paise: Paise
    gst_paise: Paise
    count: int
    settlement_date: date

    @property
    def net_paise(self) -> Paise:
        return self.gross_paise - self.refunds_paise - self.fee_paise - self.gst_paise


def merchant_payouts(
    items: Iterable[Item], mdr_bps: Mapping[str, int], settlement_date: date
) -> list[MerchantPayout]:
    gross: dict[str, int] = defaultdict(int)
    refunds: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    mcc: dict[str, str] = {}
    for item in items:
        mcc.setdefault(item.merchant_id, item.mcc)
        if item.kind is ItemKind.PAYMENT:
            gross[item.merchant_id] += item.amount_paise
            count[item.merchant_id] += 1
        else:
            refunds[item.merchant_id] += item.amount_paise
    payouts = []
    for merchant in sorted(set(gross) | set(refunds)):
        bps = mdr_bps.get(mcc[merchant], mdr_bps.get("default", 0))
        fee = round_half_up(gross[merchant] * bps, 10_000)
        gst = round_half_up(fee * GST_PERCENT, 100)
        payouts.append(
            MerchantPayout(
                merchant,
                gross[merchant],
                refunds[merchant],
                fee,
                gst,
                count[merchant],
                settlement_date,
            )
        )
    return payouts


class MismatchClass(StrEnum):
    MATCHED = "matched"
    SWITCH_ONLY = "switch_only"  # the switch debited; we have no success for it
    GATEWAY_ONLY = "gateway_only"  # we recorded a success the switch has no debit for
    AMOUNT_MISMATCH = "amount_mismatch"
    DEEMED_UNRESOLVED = "deemed_unresolved"
    # Paid into a VPA that is not one of the merchant's registered VPAs.
    PAYEE_NOT_REGISTERED = "payee_not_registered"


_HOLD = "hold: excluded from the merchant payout, raised with the switch"
ACTIONS: dict[MismatchClass, str] = {
    MismatchClass.SWITCH_ONLY: "credit adjustment: return the debit to the payer (TCC/RET)",
    MismatchClass.GATEWAY_ONLY: _HOLD,
    MismatchClass.AMOUNT_MISMATCH: _HOLD,
    MismatchClass.DEEMED_UNRESOLVED: "carried to the next cycle: check-status continues",
    MismatchClass.PAYEE_NOT_REGISTERED: (
        "withheld from the merchant payout: the payee VPA is not registered to this merchant"
    ),
}


@dataclass(frozen=True)
class JournalRow:
    """The switch's record of one debit (its own journal, the settlement file)."""

    reference: str
    kind: ItemKind
    amount_paise: Paise
    debited: bool


@dataclass(frozen=True)
class Mismatch:
    reference: str
    mismatch: MismatchClass
    gateway_status: str
    gateway_amount_paise: Paise | None
    switch_status: str
    switch_amount_paise: Paise | None

    @property
    def action(self) -> str:
        return ACTIONS[self.mismatch]


def reconcile(
    settled: Iterable[Item],
    failed: Mapping[str, Paise],
    deemed: Mapping[str, Paise],
    journal: Iterable[JournalRow],
) -> tuple[list[Item], list[Mismatch]]:
    """Compare what we settle with what the switch debited.

    ``settled``: our SUCCESS payments and refunds; ``failed``: references we failed (with
    amounts); ``deemed``: references still deemed at close; ``journal``: the switch's debits
    and non-debits for the same period. Returns (the items to settle, the mismatches).
    """
    by_ref = {row.reference: row for row in journal}
    to_settle: list[Item] = []
    mismatches: list[Mismatch] = []
    ours: set[str] = set()
    for item in settled:
        ours.add(item.reference)
        row = by_ref.get(item.reference)
        if row is None or not row.debited:
            mismatches.append(
                Mismatch(
                    item.reference,
                    MismatchClass.GATEWAY_ONLY,
                    "SUCCESS",
                    item.amount_paise,
                    "NOT_DEBITED" if row else "ABSENT",
                    row.amount_paise if row else None,
                )
            )
        elif row.amount_paise != item.amount_paise:
            mismatches.append(
                Mismatch(
                    item.reference,
                    MismatchClass.AMOUNT_MISMATCH,
                    "SUCCESS",
                    item.amount_paise,
                    "DEBITED",
                    row.amount_paise,
                )
            )
        else:
            to_settle.append(item)
    for reference, amount in sorted(deemed.items()):
        ours.add(reference)
        row = by_ref.get(reference)
        mismatches.append(
            Mismatch(
                reference,
                MismatchClass.DEEMED_UNRESOLVED,
                "DEEMED",
                amount,
                ("DEBITED" if row.debited else "NOT_DEBITED") if row else "ABSENT",
                row.amount_paise if row else None,
            )
        )
    for row in sorted(by_ref.values(), key=lambda r: r.reference):
        if row.reference in ours or not row.debited:
            continue
        mismatches.append(
            Mismatch(
                row.reference,
                MismatchClass.SWITCH_ONLY,
                "FAILED" if row.reference in failed else "UNKNOWN",
                failed.get(row.reference),
                "DEBITED",
                row.amount_paise,
            )
        )
    mismatches.sort(key=lambda m: (m.mismatch.value, m.reference))
    return to_settle, mismatches


def withhold_unregistered_payees(
    items: Iterable[Item], payee_owners: Mapping[str, str]
) -> tuple[list[Item], list[Mismatch]]:
    """Split reconciled items into those credited to their merchants and the payments whose
    payee is not a VPA registered to the merchant credited, which are withheld.

    ``payee_owners``: payee (as :attr:`Item.payee` spells it) → the merchant it is
    registered to. The gateway refuses such payees; this is the second line, for data from
    before that check or a registration that is gone. A withheld payment still moved
    between the banks (the switch debited the payer): only the merchant is not credited.
    Items whose payee is not known are credited as before.
    """
    payable: list[Item] = []
    withheld: list[Mismatch] = []
    for item in items:
        if (
            item.kind is ItemKind.PAYMENT
            and item.payee is not None
            and payee_owners.get(item.payee) != item.merchant_id
        ):
            withheld.append(
                Mismatch(
                    item.reference,
                    MismatchClass.PAYEE_NOT_REGISTERED,
                    "SUCCESS",
                    item.amount_paise,
                    "DEBITED",
                    item.amount_paise,
                )
            )
        else:
            payable.append(item)
    return payable, withheld

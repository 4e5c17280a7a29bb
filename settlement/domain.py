"""Settlement math, pure (no I/O): inter-bank net positions, merchant payouts, the
reconciliation of our records against the switch's journal, and of each payment's payee
against the VPAs registered to the merchant it is credited to; RBI's turn-around time for
payments debited and not confirmed, and the compensation owed past it.

All money is integer paise. Fees round half up once per merchant and business date:
``fee = round(gross * mdr_bps / 10_000)``, ``gst = round(fee * 18 / 100)``,
``net = gross - refunds - chargebacks - fee - gst``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum

from core.money import Paise

__all__ = [
    "GST_PERCENT",
    "TAT_COMPENSATION_PER_DAY_PAISE",
    "TAT_DAYS",
    "BankPosition",
    "Item",
    "ItemKind",
    "JournalRow",
    "MerchantPayout",
    "Mismatch",
    "MismatchClass",
    "TatBreach",
    "TatCase",
    "TransferKind",
    "interbank_positions",
    "merchant_payouts",
    "reconcile",
    "round_half_up",
    "tat_breaches",
    "tat_due_date",
    "withhold_unregistered_payees",
]

GST_PERCENT = 18


class ItemKind(StrEnum):
    PAYMENT = "PAYMENT"  # a SUCCESS payment: payer bank pays the payee bank
    REFUND = "REFUND"  # a refund credit: the payee bank pays back the payer bank
    # An accepted or lost dispute: the payee bank pays the payer bank back, and the
    # merchant's payout carries it (reference: the dispute id).
    CHARGEBACK = "CHARGEBACK"

    @property
    def returns_money(self) -> bool:
        """Money flows back from the payee's bank to the payer's."""
        return self is not ItemKind.PAYMENT


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
        if item.kind.returns_money:
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
    chargebacks_paise: Paise = 0

    @property
    def net_paise(self) -> Paise:
        return (
            self.gross_paise
            - self.refunds_paise
            - self.chargebacks_paise
            - self.fee_paise
            - self.gst_paise
        )


def merchant_payouts(
    items: Iterable[Item], mdr_bps: Mapping[str, int], settlement_date: date
) -> list[MerchantPayout]:
    gross: dict[str, int] = defaultdict(int)
    refunds: dict[str, int] = defaultdict(int)
    chargebacks: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    mcc: dict[str, str] = {}
    for item in items:
        mcc.setdefault(item.merchant_id, item.mcc)
        match item.kind:
            case ItemKind.PAYMENT:
                gross[item.merchant_id] += item.amount_paise
                count[item.merchant_id] += 1
            case ItemKind.REFUND:
                refunds[item.merchant_id] += item.amount_paise
            case ItemKind.CHARGEBACK:
                chargebacks[item.merchant_id] += item.amount_paise
    payouts = []
    for merchant in sorted(set(gross) | set(refunds) | set(chargebacks)):
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
                chargebacks[merchant],
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
    # We hold it FAILED (final); the switch reports a standing debit for it, found late.
    LATE_SUCCESS = "late_success"


_HOLD = "hold: excluded from the merchant payout, raised with the switch"
ACTIONS: dict[MismatchClass, str] = {
    MismatchClass.SWITCH_ONLY: "credit adjustment: return the debit to the payer (TCC/RET)",
    MismatchClass.GATEWAY_ONLY: _HOLD,
    MismatchClass.AMOUNT_MISMATCH: _HOLD,
    MismatchClass.DEEMED_UNRESOLVED: "carried to the next cycle: check-status continues",
    MismatchClass.PAYEE_NOT_REGISTERED: (
        "withheld from the merchant payout: the payee VPA is not registered to this merchant"
    ),
    MismatchClass.LATE_SUCCESS: (
        "reversed to payer: the engine returns the debit by credit reversal (automatic);"
        " the payment stays FAILED"
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
    held_failed: Mapping[str, Paise] | None = None,
) -> tuple[list[Item], list[Mismatch]]:
    """Compare what we settle with what the switch debited.

    ``settled``: our SUCCESS payments and refunds; ``failed``: references we failed (with
    amounts); ``deemed``: references still deemed at close; ``journal``: the switch's debits
    and non-debits for the same period. ``held_failed``: payments whose final status in our
    records is ``FAILED``, whatever their date (with amounts): a standing debit of the
    switch for one of them is a late success, which the engine gives back to the payer.
    Returns (the items to settle, the mismatches).
    """
    held_failed = held_failed or {}
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
        if row.kind is ItemKind.PAYMENT and row.reference in held_failed:
            mismatches.append(
                Mismatch(
                    row.reference,
                    MismatchClass.LATE_SUCCESS,
                    "FAILED",
                    held_failed[row.reference],
                    "DEBITED",
                    row.amount_paise,
                )
            )
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


# --------------------------------------------------------------------------- TAT

# RBI/2019-20/67 DPSS.CO.PD No.629/02.01.014/2019-20, "Harmonisation of Turn Around Time
# (TAT) and customer compensation for failed transactions" (20 September 2019), for UPI:
# a transfer debited but not credited to the beneficiary is reversed by T+1; a merchant
# payment debited but not confirmed to the merchant is reversed by T+5; past that the
# payer is owed ₹100 a day of delay. T is the day of the transaction; days are calendar
# days (IST here: business dates are IST).


class TransferKind(StrEnum):
    P2P = "P2P"  # person to person: credited to the beneficiary's account
    P2M = "P2M"  # person to merchant: every payment this engine collects


TAT_DAYS: dict[TransferKind, int] = {TransferKind.P2P: 1, TransferKind.P2M: 5}
TAT_COMPENSATION_PER_DAY_PAISE: Paise = 10_000  # ₹100


def tat_due_date(transaction_date: date, kind: TransferKind = TransferKind.P2M) -> date:
    """The last day on which the reversal is in time: T + 1 (P2P) or T + 5 (P2M)."""
    return transaction_date + timedelta(days=TAT_DAYS[kind])


@dataclass(frozen=True)
class TatCase:
    """A payment the payer may have been debited for without a confirmation: deemed (or in
    flight) still, or reversed. ``debited``: the switch's journal shows the debit (a reversed
    payment was). ``reversed_on``: the IST day of its reversal; None while open."""

    reference: str
    transaction_date: date
    debited: bool
    reversed_on: date | None = None
    kind: TransferKind = TransferKind.P2M


@dataclass(frozen=True)
class TatBreach:
    reference: str
    transaction_date: date
    due_date: date
    reversed_on: date | None  # None: still not reversed at the date settled
    days_late: int

    @property
    def compensation_paise(self) -> Paise:
        return self.days_late * TAT_COMPENSATION_PER_DAY_PAISE


def tat_breaches(cases: Iterable[TatCase], as_of: date) -> list[TatBreach]:
    """The cases past their TAT, as of the end of ``as_of``: reversed after the due date
    (days late: to the reversal, which completes the TAT), or still not reversed (days late
    so far: the compensation keeps accruing until the reversal). A payment the switch did
    not debit owes nothing, however late its answer. Sorted by reference."""
    found = []
    for case in cases:
        if not case.debited:
            continue
        due = tat_due_date(case.transaction_date, case.kind)
        end = case.reversed_on if case.reversed_on is not None else as_of
        days = (end - due).days
        if days > 0:
            found.append(
                TatBreach(case.reference, case.transaction_date, due, case.reversed_on, days)
            )
    return sorted(found, key=lambda b: b.reference)

"""Closing a business date: ``settle_business_date`` (SPEC §7).

The first run for a date closes it: under the settlement lock it reconciles the items of
that date against the switch's journal and each payment's payee against the VPAs
registered to its merchant (settlement's own copy), computes the inter-bank net positions,
the merchant payouts and the TAT breaches of payments debited and not confirmed (RBI's
harmonised turn-around time: ``tat_compensation.csv``), and stores the rendered files
with the run (and publishes ``SettlementClosed``) in one transaction. Every later run — a
rerun, or a rerun after a crash that happened after that commit — writes the stored files
again, so two runs give byte-identical files and a late event never changes a closed date:
it is carried by the next open date. Files are written to a temporary name and renamed, so
a crash never leaves a half-written file behind under the real name.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson

from core.clock import Clock
from core.events import Envelope, LateSuccessFound, SettlementClosed
from core.outbox import append_to_outbox
from core.storage import Database, sql_text
from settlement.cycles import NPCI_CYCLES, CycleTable
from settlement.domain import (
    TAT_DAYS,
    Item,
    ItemKind,
    MismatchClass,
    TatCase,
    TransferKind,
    interbank_positions,
    merchant_payouts,
    reconcile,
    tat_breaches,
    withhold_unregistered_payees,
)
from settlement.holidays import HolidayCalendar
from settlement.journal import LedgerIndex, SwitchJournal
from settlement.recorder import SETTLEMENT_LOCK

__all__ = [
    "FILES",
    "SettlementResult",
    "closed_summary",
    "settle_business_date",
    "unreversed_tat_breaches",
    "write_files",
]

FILES = (
    "interbank_net.csv",
    "merchant_payouts.csv",
    "reconciliation.csv",
    "tat_compensation.csv",
    "summary.json",
)


@dataclass(frozen=True)
class SettlementResult:
    business_date: date
    summary: dict[str, Any]
    files: dict[str, str]
    closed_now: bool
    preview: bool = False  # computed as of now for an open date; nothing was closed


def _csv(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _render(
    day: date,
    settlement_date: date,
    items: list[Item],
    failed: dict[str, int],
    deemed: dict[str, int],
    journal_rows: list[Any],
    payee_owners: Mapping[str, str],
    notes: dict[str, str],
    mdr_bps: Mapping[str, int],
    not_in_ledger: list[str] | None,
    tat_cases: list[TatCase],
    cycle_table: CycleTable = NPCI_CYCLES,
    held_failed: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    to_settle, mismatches = reconcile(items, failed, deemed, journal_rows, held_failed)
    breaches = tat_breaches(tat_cases, as_of=day)
    payable, withheld = withhold_unregistered_payees(to_settle, payee_owners)
    mismatches = sorted([*mismatches, *withheld], key=lambda m: (m.mismatch.value, m.reference))
    # A withheld payment still moved between the banks: only its merchant is not credited.
    positions = interbank_positions(to_settle)
    payouts = merchant_payouts(payable, mdr_bps, settlement_date)
    assert sum(p.net_paise for p in positions) == 0, "inter-bank nets must sum to zero"
    files = {
        "interbank_net.csv": _csv(
            ["bank", "debits_paise", "credits_paise", "net_paise"],
            [[p.bank, p.debits_paise, p.credits_paise, p.net_paise] for p in positions],
        ),
        "merchant_payouts.csv": _csv(
            [
                "merchant_id",
                "gross_paise",
                "refunds_paise",
                "chargebacks_paise",
                "fee_paise",
                "gst_on_fee_paise",
                "net_payout_paise",
                "count",
                "settlement_date",
            ],
            [
                [
                    p.merchant_id,
                    p.gross_paise,
                    p.refunds_paise,
                    p.chargebacks_paise,
                    p.fee_paise,
                    p.gst_paise,
                    p.net_paise,
                    p.count,
                    p.settlement_date.isoformat(),
                ]
                for p in payouts
            ],
        ),
        "reconciliation.csv": _csv(
            [
                "transaction_id",
                "class",
                "gateway_status",
                "gateway_amount_paise",
                "switch_status",
                "switch_amount_paise",
                "action",
            ],
            [
                [
                    m.reference,
                    m.mismatch.value,
                    m.gateway_status,
                    "" if m.gateway_amount_paise is None else m.gateway_amount_paise,
                    m.switch_status,
                    "" if m.switch_amount_paise is None else m.switch_amount_paise,
                    m.action,
                ]
                for m in mismatches
            ],
        ),
        "tat_compensation.csv": _csv(
            [
                "transaction_id",
                "transaction_date",
                "due_date",
                "reversed_on",
                "days_late",
                "compensation_paise",
            ],
            [
                [
                    b.reference,
                    b.transaction_date.isoformat(),
                    b.due_date.isoformat(),
                    b.reversed_on.isoformat() if b.reversed_on else "",
                    b.days_late,
                    b.compensation_paise,
                ]
                for b in breaches
            ],
        ),
    }
    by_class = {c.value: 0 for c in MismatchClass}
    by_class[MismatchClass.MATCHED.value] = len(payable)
    for m in mismatches:
        by_class[m.mismatch.value] += 1
    # Every cycle of the table, in its order, empty ones too (the dispute cycles stay
    # empty until chargebacks are settled in them).
    cycles: dict[str, dict[str, Any]] = {
        c.name: {"items": 0, "amount_paise": 0, "cutoff": c.cutoff, "dispute": c.dispute}
        for c in cycle_table.cycles
    }
    for item in payable:
        if item.kind is ItemKind.CHARGEBACK:
            cycle = cycles[cycle_table.dispute_cycle(item.final_at, day)]
        else:
            cycle = cycles[cycle_table.settlement_cycle(item.final_at, day)]
        cycle["items"] += 1
        cycle["amount_paise"] += item.amount_paise
    payments = [i for i in payable if i.kind is ItemKind.PAYMENT]
    refunds = [i for i in payable if i.kind is ItemKind.REFUND]
    chargebacks = [i for i in payable if i.kind is ItemKind.CHARGEBACK]
    summary = {
        "business_date": day.isoformat(),
        "settlement_date": settlement_date.isoformat(),
        "payments": len(payments),
        "gross_paise": sum(i.amount_paise for i in payments),
        "refunds": len(refunds),
        "refunds_paise": sum(i.amount_paise for i in refunds),
        "chargebacks": len(chargebacks),
        "chargebacks_paise": sum(i.amount_paise for i in chargebacks),
        "fee_paise": sum(p.fee_paise for p in payouts),
        "gst_on_fee_paise": sum(p.gst_paise for p in payouts),
        "net_payout_paise": sum(p.net_paise for p in payouts),
        "merchants": len(payouts),
        "banks": len(positions),
        "interbank_nets_sum_paise": sum(p.net_paise for p in positions),
        "reconciliation": by_class,
        "withheld_paise": sum(m.gateway_amount_paise or 0 for m in withheld),
        "cycles": cycles,
        "late_items": dict(sorted(notes.items())),
        # Payments we failed that the switch debited: each is given back to its payer.
        "late_successes": {
            m.reference: m.switch_amount_paise
            for m in mismatches
            if m.mismatch is MismatchClass.LATE_SUCCESS
        },
        "tat": {
            "breaches": len(breaches),
            "reversed_late": sum(1 for b in breaches if b.reversed_on is not None),
            "open": sum(1 for b in breaches if b.reversed_on is None),
            "days_late": sum(b.days_late for b in breaches),
            "compensation_paise": sum(b.compensation_paise for b in breaches),
        },
        "ledger": {
            "checked": not_in_ledger is not None,
            "not_in_ledger": not_in_ledger or [],
        },
    }
    files["summary.json"] = _summary_json(summary)
    return summary, files


def _summary_json(summary: dict[str, Any]) -> str:
    """Keys sorted, as ever, except the cycles: those keep the table's order (C1 ... C10,
    DC1, DC2), which sorting would scramble (C1, C10, C2, ...)."""

    def sorted_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: sorted_keys(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [sorted_keys(v) for v in value]
        return value

    ordered = sorted_keys(summary)
    ordered["cycles"] = {name: sorted_keys(cycle) for name, cycle in summary["cycles"].items()}
    return orjson.dumps(ordered, option=orjson.OPT_INDENT_2).decode() + "\n"


async def settle_business_date(
    db: Database,
    journal: SwitchJournal,
    day: date,
    *,
    ledger: LedgerIndex | None = None,
    calendar: HolidayCalendar,
    mdr_bps: Mapping[str, int],
    clock: Clock,
    cycles: CycleTable = NPCI_CYCLES,
    preview: bool = False,
) -> SettlementResult:
    """Close ``day`` (or, ``preview``, compute its files as of now and close nothing: an
    operator's intraday view of the cycles; a closed date's preview is its closed files)."""
    async with db.transaction() as conn:
        await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": SETTLEMENT_LOCK})
        stored = (
            await conn.execute(
                sql_text("SELECT summary, files FROM settlement_runs WHERE business_date = :d"),
                {"d": day},
            )
        ).first()
        if stored is not None:
            return SettlementResult(day, dict(stored.summary), dict(stored.files), False)
        rows = (
            await conn.execute(
                sql_text(
                    "SELECT event_id, kind, reference, transaction_id, merchant_id, mcc,"
                    " amount_paise, payer_bank, payee_bank, final_at, note, payee_key"
                    " FROM settlement_items WHERE cycle_date = :d ORDER BY reference"
                ),
                {"d": day},
            )
        ).all()
        items = [
            Item(
                ItemKind(r.kind),
                r.reference,
                r.transaction_id,
                r.merchant_id,
                r.mcc,
                int(r.amount_paise),
                r.payer_bank,
                r.payee_bank,
                r.final_at,
                bytes(r.payee_key).hex() if r.payee_key is not None else None,
            )
            for r in rows
        ]
        notes = {r.reference: r.note for r in rows if r.note}
        # Every settled event must be in the compliance ledger.
        missing_ids = await ledger.missing([r.event_id for r in rows]) if ledger else set()
        not_in_ledger = sorted(r.reference for r in rows if r.event_id in missing_ids)
        # A merchant's category comes from its payments (refund items carry none).
        mcc = {i.merchant_id: i.mcc for i in items if i.kind is ItemKind.PAYMENT}
        items = [i if i.mcc else replace(i, mcc=mcc.get(i.merchant_id, "0000")) for i in items]
        # Whom each payee is registered to, in settlement's own copy of the registrations.
        payees = list({bytes(r.payee_key) for r in rows if r.payee_key is not None})
        payee_owners = {
            bytes(key).hex(): merchant_id
            for key, merchant_id in (
                await conn.execute(
                    sql_text(
                        "SELECT vpa_key, merchant_id FROM settlement_merchant_vpas"
                        " WHERE vpa_key = ANY(:keys)"
                    ),
                    {"keys": payees},
                )
            ).all()
        }
        other = (
            await conn.execute(
                sql_text(
                    "SELECT reference, status, amount_paise, business_date, transaction_date"
                    " FROM settlement_other"
                    " WHERE (status IN ('FAILED', 'BLOCKED', 'REVERSED') AND business_date = :d)"
                    " OR (status IN ('PENDING', 'DEEMED') AND business_date <= :d)"
                ),
                {"d": day},
            )
        ).all()
        unresolved = ("PENDING", "DEEMED")
        failed = {
            r.reference: int(r.amount_paise or 0)
            for r in other
            if r.status not in unresolved and r.status != "REVERSED"
        }
        deemed = {r.reference: int(r.amount_paise or 0) for r in other if r.status in unresolved}
        known_success = set(
            (
                await conn.execute(
                    sql_text(
                        "SELECT reference FROM settlement_other WHERE status = 'SETTLED'"
                        " AND business_date <> :d"
                    ),
                    {"d": day},
                )
            ).scalars()
        )
        references = [i.reference for i in items] + list(failed) + list(deemed)
        wanted = set(references)
        journal_rows = [
            r
            for r in await journal.rows(day, references)
            # A debit of this date that our records settle with another date (final just
            # after midnight, or carried late): not a mismatch here.
            if r.reference in wanted or r.reference not in known_success
        ]
        # A standing debit for a payment we hold FAILED (of this date or an earlier one):
        # a late success.
        unmatched = sorted(
            r.reference
            for r in journal_rows
            if r.debited and r.kind is ItemKind.PAYMENT and r.reference not in deemed
        )
        held_failed = {
            row.reference: int(row.amount_paise or 0)
            for row in (
                await conn.execute(
                    sql_text(
                        "SELECT reference, amount_paise FROM settlement_other"
                        " WHERE status = 'FAILED' AND reference = ANY(:refs)"
                    ),
                    {"refs": unmatched},
                )
            )
        }
        # RBI's TAT: the payments reversed on this date, and those not confirmed nor
        # reversed yet that the switch did debit (its journal says so).
        debited = {r.reference for r in journal_rows if r.debited}
        tat_cases = [
            TatCase(r.reference, r.transaction_date, debited=True, reversed_on=day)
            for r in other
            if r.status == "REVERSED" and r.transaction_date is not None
        ] + [
            TatCase(
                r.reference,
                r.transaction_date or r.business_date,
                debited=r.reference in debited,
            )
            for r in other
            if r.status in unresolved
        ]
        settlement_date = calendar.next_working_day(day)
        summary, files = _render(
            day,
            settlement_date,
            items,
            failed,
            deemed,
            journal_rows,
            payee_owners,
            notes,
            mdr_bps,
            not_in_ledger if ledger else None,
            tat_cases,
            cycles,
            held_failed,
        )
        if preview:
            return SettlementResult(day, summary, files, False, preview=True)
        now = clock.now()
        await conn.execute(
            sql_text(
                "INSERT INTO settlement_runs (business_date, settlement_date, closed_at, summary,"
                " files) VALUES (:d, :s, :at, CAST(:sum AS jsonb), CAST(:f AS jsonb))"
            ),
            {
                "d": day,
                "s": settlement_date,
                "at": now,
                "sum": orjson.dumps(summary).decode(),
                "f": orjson.dumps(files).decode(),
            },
        )
        event = SettlementClosed(
            business_date=day.isoformat(),
            cycle=1,
            payments=summary["payments"],
            gross_paise=summary["gross_paise"],
            refunds_paise=summary["refunds_paise"],
            closed_at=now,
        )
        # Each late success found goes back to its payer (payments/late_success.py): the
        # intent is published with the close, so a crash cannot lose it.
        found = [
            LateSuccessFound(
                transaction_id=reference,
                business_date=day.isoformat(),
                amount_paise=amount,
                found_at=now,
            )
            for reference, amount in summary["late_successes"].items()
        ]
        await append_to_outbox(
            conn,
            [
                Envelope.wrap(e, partition_key=f"settlement:{day}", occurred_at=now)
                for e in (event, *found)
            ],
        )
    return SettlementResult(day, summary, files, True)


async def closed_summary(db: Database, day: date) -> dict[str, Any] | None:
    async with db.connection() as conn:
        row = (
            await conn.execute(
                sql_text("SELECT summary FROM settlement_runs WHERE business_date = :d"), {"d": day}
            )
        ).first()
    return dict(row.summary) if row is not None else None


def write_files(result: SettlementResult, out_dir: Path) -> Path:
    target = out_dir / (result.business_date.isoformat() + ("-preview" if result.preview else ""))
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if name not in result.files:  # a date closed before this file existed
            continue
        tmp = target / f".{name}.tmp"
        tmp.write_text(result.files[name])
        os.replace(tmp, target / name)
    return target


async def unreversed_tat_breaches(db: Database, journal: SwitchJournal, today: date) -> int:
    """Payments past their TAT and not reversed as of ``today`` (``upi_tat_breaches``): not
    confirmed, not reversed, debited at the switch, and sent more than T + 5 days ago."""
    latest_t = today - timedelta(days=TAT_DAYS[TransferKind.P2M] + 1)
    async with db.connection() as conn:
        rows = (
            await conn.execute(
                sql_text(
                    "SELECT reference, coalesce(transaction_date, business_date) AS sent_on"
                    " FROM settlement_other WHERE status IN ('PENDING', 'DEEMED')"
                    " AND coalesce(transaction_date, business_date) <= :t"
                ),
                {"t": latest_t},
            )
        ).all()
    if not rows:
        return 0
    debited = {
        r.reference for r in await journal.rows(today, [r.reference for r in rows]) if r.debited
    }
    cases = [TatCase(r.reference, r.sent_on, debited=r.reference in debited) for r in rows]
    return len(tat_breaches(cases, as_of=today))

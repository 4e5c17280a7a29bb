"""Closing a business date: ``settle_business_date`` (SPEC §7).

The first run for a date closes it: under the settlement lock it reconciles the items of
that date against the switch's journal and each payment's payee against the VPAs
registered to its merchant (settlement's own copy), computes the inter-bank net positions
and the merchant payouts, and stores the rendered files with the run (and publishes
``SettlementClosed``) in one transaction. Every later run — a rerun, or a rerun after a
crash that happened after that commit — writes the stored files again, so two runs give
byte-identical files and a late event never changes a closed date: it is carried by the
next open date. Files are written to a temporary name and renamed, so a crash never
leaves a half-written file behind under the real name.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import orjson

from core.clock import Clock
from core.events import Envelope, SettlementClosed
from core.outbox import append_to_outbox
from core.storage import Database, sql_text
from settlement.domain import (
    Item,
    ItemKind,
    MismatchClass,
    cycle_of,
    interbank_positions,
    merchant_payouts,
    reconcile,
    withhold_unregistered_payees,
)
from settlement.holidays import HolidayCalendar
from settlement.journal import LedgerIndex, SwitchJournal
from settlement.recorder import SETTLEMENT_LOCK

__all__ = ["FILES", "SettlementResult", "closed_summary", "settle_business_date", "write_files"]

FILES = ("interbank_net.csv", "merchant_payouts.csv", "reconciliation.csv", "summary.json")


@dataclass(frozen=True)
class SettlementResult:
    business_date: date
    summary: dict[str, Any]
    files: dict[str, str]
    closed_now: bool


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
) -> tuple[dict[str, Any], dict[str, str]]:
    to_settle, mismatches = reconcile(items, failed, deemed, journal_rows)
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
    }
    by_class = {c.value: 0 for c in MismatchClass}
    by_class[MismatchClass.MATCHED.value] = len(payable)
    for m in mismatches:
        by_class[m.mismatch.value] += 1
    cycles: dict[str, dict[str, int]] = {}
    for item in payable:
        cycle = cycles.setdefault(str(cycle_of(item.final_at)), {"items": 0, "amount_paise": 0})
        cycle["items"] += 1
        cycle["amount_paise"] += item.amount_paise
    payments = [i for i in payable if i.kind is ItemKind.PAYMENT]
    refunds = [i for i in payable if i.kind is ItemKind.REFUND]
    summary = {
        "business_date": day.isoformat(),
        "settlement_date": settlement_date.isoformat(),
        "payments": len(payments),
        "gross_paise": sum(i.amount_paise for i in payments),
        "refunds": len(refunds),
        "refunds_paise": sum(i.amount_paise for i in refunds),
        "fee_paise": sum(p.fee_paise for p in payouts),
        "gst_on_fee_paise": sum(p.gst_paise for p in payouts),
        "net_payout_paise": sum(p.net_paise for p in payouts),
        "merchants": len(payouts),
        "banks": len(positions),
        "interbank_nets_sum_paise": sum(p.net_paise for p in positions),
        "reconciliation": by_class,
        "withheld_paise": sum(m.gateway_amount_paise or 0 for m in withheld),
        "cycles": dict(sorted(cycles.items(), key=lambda kv: int(kv[0]))),
        "late_items": dict(sorted(notes.items())),
        "ledger": {
            "checked": not_in_ledger is not None,
            "not_in_ledger": not_in_ledger or [],
        },
    }
    files["summary.json"] = (
        orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
    )
    return summary, files


async def settle_business_date(
    db: Database,
    journal: SwitchJournal,
    day: date,
    *,
    ledger: LedgerIndex | None = None,
    calendar: HolidayCalendar,
    mdr_bps: Mapping[str, int],
    clock: Clock,
) -> SettlementResult:
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
                    "SELECT reference, status, amount_paise FROM settlement_other"
                    " WHERE (status IN ('FAILED', 'BLOCKED') AND business_date = :d)"
                    " OR (status IN ('PENDING', 'DEEMED') AND business_date <= :d)"
                ),
                {"d": day},
            )
        ).all()
        unresolved = ("PENDING", "DEEMED")
        failed = {
            r.reference: int(r.amount_paise or 0) for r in other if r.status not in unresolved
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
        )
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
        await append_to_outbox(
            conn, [Envelope.wrap(event, partition_key=f"settlement:{day}", occurred_at=now)]
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
    target = out_dir / result.business_date.isoformat()
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        tmp = target / f".{name}.tmp"
        tmp.write_text(result.files[name])
        os.replace(tmp, target / name)
    return target

"""Final-status events → settlement items, in IST business dates.

A payment belongs to the IST calendar day of its final status. Payments sent to the switch
(``PaymentSubmitted``) or deemed, and not final yet, are tracked as unresolved, so that a
debit the switch already made for them is not taken for a mismatch at close. If that day was already
closed when the event arrives, the item goes to the next open business date, with a note.
The advisory lock it shares with :func:`settlement.run.settle_business_date` makes that
decision race-free: an item is either in the closed date's snapshot or in a later one.

Settlement also keeps its own copy of the merchants' collection VPAs
(``MerchantVpaRegistered``), and the payee of each payment, both as keyed pseudonyms: at the
close, a payment whose payee is not registered to its merchant is withheld from the payout.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from core import tracing
from core.bus.base import Subscription
from core.clock import business_date
from core.crypto import MasterKey
from core.events import (
    CATALOGUE,
    DisputeAccepted,
    DisputeOutcome,
    DisputeResolved,
    Envelope,
    MerchantVpaRegistered,
    PaymentBlocked,
    PaymentDeemed,
    PaymentFailed,
    PaymentReversed,
    PaymentSubmitted,
    PaymentSucceeded,
    RefundSucceeded,
    Topic,
)
from core.storage import Database, sql_text

__all__ = ["PAYEE_PSEUDONYM", "SETTLEMENT_LOCK", "SettlementRecorder", "open_cycle_date"]

SETTLEMENT_LOCK = 0x5550_5354  # "UPST"
# The pseudonym purpose of payee and registered VPAs (its own: settlement's keys do not
# join with another context's pseudonyms of the same VPA).
PAYEE_PSEUDONYM = "settlement-payee"
_EVENTS = frozenset(
    {
        PaymentSucceeded.name,
        RefundSucceeded.name,
        PaymentFailed.name,
        PaymentBlocked.name,
        PaymentReversed.name,
        PaymentDeemed.name,
        PaymentSubmitted.name,
        MerchantVpaRegistered.name,
        DisputeAccepted.name,
        DisputeResolved.name,
    }
)


async def open_cycle_date(conn: AsyncConnection, day: date) -> date:
    closed = set(
        (
            await conn.execute(
                sql_text("SELECT business_date FROM settlement_runs WHERE business_date >= :d"),
                {"d": day},
            )
        ).scalars()
    )
    while day in closed:
        day += timedelta(days=1)
    return day


class SettlementRecorder:
    consumer = "settlement"

    def __init__(self, db: Database, master_key: MasterKey) -> None:
        self._db = db
        self._key = master_key

    def _payee_key(self, vpa: str) -> bytes:
        return self._key.pseudonym(vpa, PAYEE_PSEUDONYM)

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=lambda envelope: self.record([envelope]),
            batch_handler=self.record,
            event_types=_EVENTS,
        )

    async def record(self, envelopes: Sequence[Envelope]) -> None:
        """Record a batch; each traced event of it that settles or resolves a payment gets
        a ``settlement.record`` span (a submission, only registered as unresolved, gets
        none: one span fewer per payment, tracing's cost is per span)."""
        wanted = [e for e in envelopes if e.event_type in _EVENTS]
        traced = [e for e in wanted if e.event_type != PaymentSubmitted.name]
        with tracing.event_spans(traced, "settlement.record"):
            await self._record(wanted)

    async def _record(self, envelopes: Sequence[Envelope]) -> None:
        items: list[dict[str, object]] = []
        # reference, status, amount, business date, at, transaction date (T, for the TAT)
        others: list[tuple[str, str, int | None, date, datetime, date | None]] = []
        registrations: list[dict[str, object]] = []
        for envelope in envelopes:
            if envelope.event_type not in _EVENTS:
                continue
            event = CATALOGUE.decode(envelope)
            match event:
                case PaymentSucceeded():
                    items.append(
                        _item(
                            envelope,
                            "PAYMENT",
                            event.transaction_id,
                            event.transaction_id,
                            event.merchant_id,
                            event.merchant_mcc,
                            event.amount_paise,
                            event.payer_bank,
                            event.payee_bank,
                            event.completed_at,
                            self._payee_key(event.payee_vpa.value),
                        )
                    )
                    others.append(
                        (
                            event.transaction_id,
                            "SETTLED",
                            None,
                            business_date(event.completed_at),
                            event.completed_at,
                            None,
                        )
                    )
                case RefundSucceeded():
                    items.append(
                        _item(
                            envelope,
                            "REFUND",
                            event.refund_id,
                            event.transaction_id,
                            event.merchant_id,
                            "",
                            event.amount_paise,
                            event.payer_bank,
                            event.payee_bank,
                            event.completed_at,
                            None,
                        )
                    )
                case DisputeAccepted() | DisputeResolved():
                    if isinstance(event, DisputeResolved) and event.outcome is not (
                        DisputeOutcome.LOST
                    ):
                        continue  # won: the merchant keeps the money
                    at = (
                        event.accepted_at
                        if isinstance(event, DisputeAccepted)
                        else event.resolved_at
                    )
                    items.append(
                        _item(
                            envelope,
                            "CHARGEBACK",
                            event.dispute_id,
                            event.transaction_id,
                            event.merchant_id,
                            "",
                            event.amount_paise,
                            event.payer_bank,
                            event.payee_bank,
                            at,
                            None,
                        )
                    )
                case PaymentFailed() | PaymentBlocked() | PaymentReversed():
                    others.append(
                        (
                            event.transaction_id,
                            event.name.removeprefix("Payment").upper(),
                            event.amount_paise,
                            business_date(event.completed_at),
                            event.completed_at,
                            None,
                        )
                    )
                case PaymentDeemed():
                    others.append(
                        (
                            event.transaction_id,
                            "DEEMED",
                            None,
                            business_date(event.deemed_at),
                            event.deemed_at,
                            business_date(event.deemed_at),
                        )
                    )
                case PaymentSubmitted():
                    # Sent to the switch, no answer yet: unresolved until a final status.
                    others.append(
                        (
                            event.transaction_id,
                            "PENDING",
                            event.amount_paise,
                            business_date(event.submitted_at),
                            event.submitted_at,
                            business_date(event.submitted_at),  # T: the day it was sent
                        )
                    )
                case MerchantVpaRegistered():
                    registrations.append(
                        {
                            "k": self._payee_key(event.vpa.value),
                            "m": event.merchant_id,
                            "at": event.registered_at,
                        }
                    )
        if not items and not others and not registrations:
            return
        async with self._db.transaction() as conn:
            await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": SETTLEMENT_LOCK})
            cycle_of_day: dict[date, date] = {}
            for item in items:
                day = item["business_date"]
                assert isinstance(day, date)
                if day not in cycle_of_day:
                    cycle_of_day[day] = await open_cycle_date(conn, day)
                item["cycle_date"] = cycle_of_day[day]
                if cycle_of_day[day] != day:
                    item["note"] = (
                        f"late: final status on {day}, which was already closed;"
                        f" settled with {cycle_of_day[day]}"
                    )
            if registrations:
                # One VPA belongs to one merchant (the gateway's rule): the first wins.
                await conn.execute(
                    sql_text(
                        "INSERT INTO settlement_merchant_vpas (vpa_key, merchant_id,"
                        " registered_at) VALUES (:k, :m, :at) ON CONFLICT (vpa_key) DO NOTHING"
                    ),
                    registrations,
                )
            if items:
                columns = {
                    name: [item[name] for item in items]
                    for name in (
                        "event_id",
                        "kind",
                        "reference",
                        "transaction_id",
                        "merchant_id",
                        "mcc",
                        "amount_paise",
                        "payer_bank",
                        "payee_bank",
                        "final_at",
                        "business_date",
                        "cycle_date",
                        "note",
                        "payee_key",
                    )
                }
                columns["event_id"] = [str(e) for e in columns["event_id"]]
                await conn.execute(_INSERT_ITEMS, columns)
            if others:
                latest = _latest_per_reference(others)
                await conn.execute(
                    _UPSERT_OTHERS,
                    {
                        "r": list(latest),
                        "s": [o[0] for o in latest.values()],
                        "a": [o[1] for o in latest.values()],
                        "d": [o[2] for o in latest.values()],
                        "at": [o[3] for o in latest.values()],
                        "t": [o[4] for o in latest.values()],
                    },
                )


_INSERT_ITEMS = sql_text(
    "INSERT INTO settlement_items (event_id, kind, reference, transaction_id, merchant_id, mcc,"
    " amount_paise, payer_bank, payee_bank, final_at, business_date, cycle_date, note, payee_key)"
    " SELECT * FROM unnest(CAST(:event_id AS uuid[]), CAST(:kind AS text[]),"
    " CAST(:reference AS text[]), CAST(:transaction_id AS text[]), CAST(:merchant_id AS text[]),"
    " CAST(:mcc AS text[]), CAST(:amount_paise AS bigint[]), CAST(:payer_bank AS text[]),"
    " CAST(:payee_bank AS text[]), CAST(:final_at AS timestamptz[]),"
    " CAST(:business_date AS date[]), CAST(:cycle_date AS date[]), CAST(:note AS text[]),"
    " CAST(:payee_key AS bytea[]))"
    " ON CONFLICT DO NOTHING"
)
# A final status never goes back to DEEMED; later events win otherwise. The transaction
# date (T of the TAT) is the first one seen, and kept.
_UPSERT_OTHERS = sql_text(
    "INSERT INTO settlement_other (reference, status, amount_paise, business_date, updated_at,"
    " transaction_date)"
    " SELECT * FROM unnest(CAST(:r AS text[]), CAST(:s AS text[]), CAST(:a AS bigint[]),"
    " CAST(:d AS date[]), CAST(:at AS timestamptz[]), CAST(:t AS date[]))"
    " ON CONFLICT (reference) DO UPDATE SET status = EXCLUDED.status,"
    " amount_paise = coalesce(EXCLUDED.amount_paise, settlement_other.amount_paise),"
    " business_date = EXCLUDED.business_date, updated_at = EXCLUDED.updated_at,"
    " transaction_date = coalesce(settlement_other.transaction_date, EXCLUDED.transaction_date)"
    " WHERE settlement_other.status IN ('PENDING', 'DEEMED')"
)
_UNRESOLVED = ("PENDING", "DEEMED")


def _latest_per_reference(
    others: Sequence[tuple[str, str, int | None, date, datetime, date | None]],
) -> dict[str, tuple[str, int | None, date, datetime, date | None]]:
    """The batch's events folded per reference by the rule of :data:`_UPSERT_OTHERS` (a
    later event replaces an unresolved status, never a final one; the first transaction
    date stays), so that one statement does what one statement per event in order did."""
    latest: dict[str, tuple[str, int | None, date, datetime, date | None]] = {}
    for reference, status, amount, day, at, txn_date in others:
        before = latest.get(reference)
        if before is None:
            latest[reference] = (status, amount, day, at, txn_date)
        elif before[0] in _UNRESOLVED:
            latest[reference] = (
                status,
                amount if amount is not None else before[1],
                day,
                at,
                before[4] if before[4] is not None else txn_date,
            )
    return latest


def _item(
    envelope: Envelope,
    kind: str,
    reference: str,
    transaction_id: str,
    merchant_id: str,
    mcc: str,
    amount: int,
    payer_bank: str,
    payee_bank: str,
    final_at: datetime,
    payee_key: bytes | None,
) -> dict[str, object]:
    return {
        "event_id": envelope.event_id,
        "kind": kind,
        "reference": reference,
        "transaction_id": transaction_id,
        "merchant_id": merchant_id,
        "mcc": mcc,
        "amount_paise": amount,
        "payer_bank": payer_bank,
        "payee_bank": payee_bank,
        "final_at": final_at,
        "business_date": business_date(final_at),
        "cycle_date": None,
        "note": None,
        "payee_key": payee_key,
    }

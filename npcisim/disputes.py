"""The mock switch's dispute desk: payers' complaints (UDIR) as the merchant's side sees them.

The switch raises a complaint about a successful payment when its payer is the ``dispute``
sandbox payer (``after_s`` after the payment), when a drill injects ``dispute_rate`` on the
payer's bank, for a small share of ordinary payments (a bank profile's ``dispute_rate``,
times the decline scale), or when asked directly (:meth:`DisputeDesk.raise_dispute`).

Rules, as reported for NPCI's 2023-2025 circulars, and ours where nothing was published:

* a complaint can be raised within 45 days of the payment (NPCI, June 2024);
* at most 10 chargebacks per payer in a rolling 30 days (reason ``CD1``) and 5 per
  payer-payee pair (``CD2``) (NPCI, December 2023); over a cap, none is raised;
* only what was not refunded can be disputed;
* the merchant's side answers by ``respond_by`` = raised + ``respond_s`` (ours: 5 days);
  unanswered, the complaint is deemed accepted at ``respond_by``;
* a contested complaint is decided ``decide_s`` later (ours: 1 day): ``WON`` when the
  evidence names at least one document, ``LOST`` otherwise (the mock's rule);
* accepted or lost is a chargeback: the amount moves from the payee's account back to the
  payer's, as a ``CHARGEBACK`` row of the switch's journal keyed by the dispute id.

Every timer is at NPCI's pace, times ``time_scale``. Deadlines are applied lazily: each read
of the feed, and each answer, first settles what fell due, so no timer task is needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.errors import SwitchError
from core.ids import new_event_id, new_rrn
from core.storage import Database, sql_text
from payments.npci.switch import DisputeNotice

__all__ = [
    "COMPLAINT_REASONS",
    "DISPUTES_REFUSED",
    "DisputeDesk",
    "DisputeRules",
    "SuccessfulPay",
]

# The complaint reasons the mock raises (UDIR's are numbered codes; ours are names).
COMPLAINT_REASONS = ("goods_not_received", "services_not_rendered", "duplicate", "unauthorised")
_SANDBOX_REASON = "goods_not_received"

DISPUTES_REFUSED = Counter(
    "npci_mock_disputes_refused_total",
    "Complaints the mock NPCI switch did not raise, by NPCI reason code",
    ["code"],
)

_DAY = 86_400.0


@dataclass(frozen=True)
class DisputeRules:
    """NPCI's dispute rules (as reported) and ours; durations at NPCI's pace, in seconds."""

    raise_within_s: float = 45 * _DAY
    payer_cap: int = 10  # CD1
    pair_cap: int = 5  # CD2
    cap_window_s: float = 30 * _DAY
    after_s: float = 5.0  # the sandbox payer's complaint comes this long after the payment
    respond_s: float = 5 * _DAY
    decide_s: float = _DAY

    def scaled(self, scale: float) -> DisputeRules:
        return DisputeRules(
            raise_within_s=self.raise_within_s * scale,
            payer_cap=self.payer_cap,
            pair_cap=self.pair_cap,
            cap_window_s=self.cap_window_s * scale,
            after_s=self.after_s * scale,
            respond_s=self.respond_s * scale,
            decide_s=self.decide_s * scale,
        )


@dataclass(frozen=True)
class SuccessfulPay:
    """A payment the switch just completed, as the desk needs it."""

    txn_id: str
    payer_vpa: str
    payee_vpa: str
    payer_bank: str
    payee_bank: str
    amount_paise: int
    dispute_rate: float  # the chance a complaint follows (sandbox payer: 1)


class DisputeDesk:
    def __init__(self, db: Database, clock: Clock, rules: DisputeRules, seed: int | None = None):
        self._db = db
        self._clock = clock
        self.rules = rules
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------ raising

    async def after_payments(self, conn: AsyncConnection, pays: Sequence[SuccessfulPay]) -> None:
        """In the transaction that completed ``pays``: the complaints that will follow."""
        chosen = [p for p in pays if p.dispute_rate > 0 and self._rng.random() < p.dispute_rate]
        if not chosen:
            return
        now = self._clock.now()
        for p in chosen:
            reason = _SANDBOX_REASON if p.dispute_rate >= 1 else self._rng.choice(COMPLAINT_REASONS)
            await self._open(conn, p, reason, now + timedelta(seconds=self.rules.after_s))

    async def raise_dispute(self, txn_id: str, reason: str = _SANDBOX_REASON) -> DisputeNotice:
        """A complaint about ``txn_id`` now (drills and tests); refused with the NPCI reason
        (``SwitchError``) when no such payment succeeded, it is too old, it was refunded
        in full, it is disputed already, or a cap is reached."""
        now = self._clock.now()
        async with self._db.transaction() as conn:
            row = (
                await conn.execute(
                    sql_text(
                        "SELECT txn_id, payer_vpa, payee_vpa, payer_bank, payee_bank,"
                        " amount_paise, created_at FROM npci_sim.transactions"
                        " WHERE txn_id = :t AND kind = 'PAY' AND debited"
                    ),
                    {"t": txn_id},
                )
            ).first()
            if row is None:
                raise SwitchError(f"no successful payment {txn_id} to dispute")
            if now - row.created_at > timedelta(seconds=self.rules.raise_within_s):
                raise SwitchError("complaint window closed (45 days)")
            pay = SuccessfulPay(
                row.txn_id,
                row.payer_vpa,
                row.payee_vpa,
                row.payer_bank,
                row.payee_bank,
                int(row.amount_paise),
                1.0,
            )
            dispute_id = await self._open(conn, pay, reason, now)
            if dispute_id is None:
                raise SwitchError(
                    f"no complaint raised for {txn_id} (capped, refunded or disputed)"
                )
            return await self._notice(conn, dispute_id)

    async def _open(
        self, conn: AsyncConnection, pay: SuccessfulPay, reason: str, raised_at: datetime
    ) -> str | None:
        """Insert an ``OPEN`` complaint unless a rule refuses it; its id, or None."""
        await conn.execute(
            sql_text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": "npci-disputes:" + pay.payer_vpa},
        )
        since = raised_at - timedelta(seconds=self.rules.cap_window_s)
        counts = (
            await conn.execute(
                sql_text(
                    "SELECT count(*) AS payer, count(*) FILTER (WHERE payee_vpa = :e) AS pair"
                    " FROM npci_sim.disputes WHERE payer_vpa = :p AND raised_at > :since"
                ),
                {"p": pay.payer_vpa, "e": pay.payee_vpa, "since": since},
            )
        ).one()
        if counts.payer >= self.rules.payer_cap:
            DISPUTES_REFUSED.labels("CD1").inc()
            return None
        if counts.pair >= self.rules.pair_cap:
            DISPUTES_REFUSED.labels("CD2").inc()
            return None
        refunded = (
            await conn.execute(
                sql_text(
                    "SELECT COALESCE(sum(amount_paise), 0) FROM npci_sim.transactions"
                    " WHERE original_txn_id = :t AND kind = 'REFUND' AND debited"
                ),
                {"t": pay.txn_id},
            )
        ).scalar_one()
        amount = pay.amount_paise - int(refunded)
        if amount <= 0:
            return None
        dispute_id = "DSP" + new_event_id().hex[:20]
        inserted = (
            await conn.execute(
                sql_text(
                    "INSERT INTO npci_sim.disputes (dispute_id, txn_id, payer_vpa, payee_vpa,"
                    " payer_bank, payee_bank, amount_paise, reason, raised_at, respond_by,"
                    " status, changed_at) VALUES (:d, :t, :p, :e, :pb, :eb, :a, :r, :at, :by,"
                    " 'OPEN', :at) ON CONFLICT (txn_id) DO NOTHING RETURNING dispute_id"
                ),
                {
                    "d": dispute_id,
                    "t": pay.txn_id,
                    "p": pay.payer_vpa,
                    "e": pay.payee_vpa,
                    "pb": pay.payer_bank,
                    "eb": pay.payee_bank,
                    "a": amount,
                    "r": reason,
                    "at": raised_at,
                    "by": raised_at + timedelta(seconds=self.rules.respond_s),
                },
            )
        ).first()
        return dispute_id if inserted is not None else None

    # ------------------------------------------------------------------ the feed

    async def updates(self, since: datetime, limit: int = 500) -> list[DisputeNotice]:
        now = self._clock.now()
        async with self._db.transaction() as conn:
            await self._settle_due(conn, now)
            rows = await conn.execute(
                sql_text(
                    _SELECT + " WHERE changed_at > :since AND changed_at <= :now"
                    " ORDER BY changed_at, dispute_id LIMIT :n"
                ),
                {"since": since, "now": now, "n": limit},
            )
            return [_notice(r) for r in rows]

    async def answer(
        self, dispute_id: str, *, accept: bool, evidence: str | None, documents: Sequence[str]
    ) -> DisputeNotice:
        now = self._clock.now()
        async with self._db.transaction() as conn:
            await self._settle_due(conn, now, dispute_id)
            row = (
                await conn.execute(
                    sql_text(_SELECT + " WHERE dispute_id = :d AND raised_at <= :now FOR UPDATE"),
                    {"d": dispute_id, "now": now},
                )
            ).first()
            if row is None:
                raise SwitchError(f"no dispute {dispute_id}")
            if row.status == "OPEN":
                if accept:
                    await _chargeback(conn, row, "ACCEPTED", now)
                else:
                    await conn.execute(
                        sql_text(
                            "UPDATE npci_sim.disputes SET status = 'CONTESTED', evidence = :ev,"
                            " documents = :docs, decided_at = :at, changed_at = :now"
                            " WHERE dispute_id = :d"
                        ),
                        {
                            "ev": evidence or "",
                            "docs": list(documents),
                            "at": now + timedelta(seconds=self.rules.decide_s),
                            "now": now,
                            "d": dispute_id,
                        },
                    )
            return await self._notice(conn, dispute_id)

    async def _settle_due(
        self, conn: AsyncConnection, now: datetime, dispute_id: str | None = None
    ) -> None:
        """Deem accepted what nobody answered by ``respond_by``; decide what is due."""
        only = " AND dispute_id = :d" if dispute_id else ""
        due = await conn.execute(
            sql_text(
                _SELECT + " WHERE ((status = 'OPEN' AND respond_by <= :now)"
                " OR (status = 'CONTESTED' AND decided_at <= :now))"
                + only
                + " ORDER BY dispute_id FOR UPDATE SKIP LOCKED"
            ),
            {"now": now, "d": dispute_id},
        )
        for row in due.all():
            if row.status == "OPEN":
                await _chargeback(conn, row, "ACCEPTED", row.respond_by)
            elif row.documents:
                await conn.execute(
                    sql_text(
                        "UPDATE npci_sim.disputes SET status = 'WON', changed_at = decided_at"
                        " WHERE dispute_id = :d"
                    ),
                    {"d": row.dispute_id},
                )
            else:
                await _chargeback(conn, row, "LOST", row.decided_at)

    async def _notice(self, conn: AsyncConnection, dispute_id: str) -> DisputeNotice:
        row = (
            await conn.execute(sql_text(_SELECT + " WHERE dispute_id = :d"), {"d": dispute_id})
        ).one()
        return _notice(row)


_SELECT = (
    "SELECT dispute_id, txn_id, payer_vpa, payee_vpa, payer_bank, payee_bank, amount_paise,"
    " reason, raised_at, respond_by, status, decided_at, changed_at, documents"
    " FROM npci_sim.disputes"
)


def _notice(row: Any) -> DisputeNotice:
    return DisputeNotice(
        dispute_id=row.dispute_id,
        txn_id=row.txn_id,
        amount_paise=int(row.amount_paise),
        reason=row.reason,
        raised_at=row.raised_at,
        respond_by=row.respond_by,
        status=row.status,
        changed_at=row.changed_at,
        payer_bank=row.payer_bank,
        payee_bank=row.payee_bank,
        decided_at=row.decided_at if row.status in ("WON", "LOST", "ACCEPTED") else None,
    )


async def _chargeback(conn: AsyncConnection, row: Any, status: str, at: datetime) -> None:
    """Close ``row`` as ``status`` at ``at`` and give the money back: the payee's account
    pays the payer's (as far as it can: a bank covers an overdrawn merchant here by
    failing the row, which settlement reconciles), journalled under the dispute id."""
    moved = (
        await conn.execute(
            sql_text(
                "UPDATE npci_sim.accounts SET balance_paise = balance_paise - :a"
                " WHERE vpa = :v AND balance_paise >= :a RETURNING 1"
            ),
            {"a": row.amount_paise, "v": row.payee_vpa},
        )
    ).first() is not None
    if moved:
        await conn.execute(
            sql_text(
                "INSERT INTO npci_sim.accounts AS acc (vpa, bank, balance_paise)"
                " VALUES (:v, :b, :a)"
                " ON CONFLICT (vpa) DO UPDATE SET balance_paise = acc.balance_paise + :a"
            ),
            {"v": row.payer_vpa, "b": row.payer_bank, "a": row.amount_paise},
        )
    await conn.execute(
        sql_text(
            "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa, payer_bank,"
            " payee_bank, amount_paise, status, response_code, rrn, debited, visible_at,"
            " created_at, original_txn_id) VALUES (:d, 'CHARGEBACK', :p, :e, :pb, :eb, :a, :s,"
            " :c, :rrn, :moved, :at, :at, :t) ON CONFLICT (txn_id) DO NOTHING"
        ),
        {
            "d": row.dispute_id,
            "p": row.payer_vpa,
            "e": row.payee_vpa,
            "pb": row.payer_bank,
            "eb": row.payee_bank,
            "a": row.amount_paise,
            "s": "SUCCESS" if moved else "FAILED",
            "c": "00" if moved else "Z9",
            "rrn": new_rrn(),
            "moved": moved,
            "at": at,
            "t": row.txn_id,
        },
    )
    await conn.execute(
        sql_text(
            "UPDATE npci_sim.disputes SET status = :s, decided_at = :at, changed_at = :at"
            " WHERE dispute_id = :d"
        ),
        {"s": status, "at": at, "d": row.dispute_id},
    )

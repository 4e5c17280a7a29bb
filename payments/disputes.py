"""Disputes: payers' complaints raised through the switch (UDIR), answered by the merchant.

The lifecycle (SPEC §4), one place:

    OPEN ──accept──────────────▶ ACCEPTED   (a chargeback)
      │ └─respond_by passes────▶ ACCEPTED   (auto: nobody answered in time)
      └──contest(evidence)────▶ CONTESTED ──switch decides──▶ WON | LOST (LOST: a chargeback)

Who does what:

* :class:`DisputeWatcher` (switch role) reads the switch's dispute feed and records what it
  says (a new complaint, a decision), accepts what is overdue, and sends the merchant's
  answers to the switch. It is the only part that talks to the switch.
* The gateway (:func:`accept_dispute`, :func:`contest_dispute`) records the merchant's answer
  with its event in one transaction; the watcher delivers it.
* Every change is an event (``DisputeRaised``, ``DisputeAccepted``, ``DisputeContested``,
  ``DisputeResolved``) through the outbox: the ledger records it, webhooks notify the
  merchant (``dispute.*``), settlement debits a chargeback in its dispute cycle.

The evidence is the merchant's free text: sealed under the master key at rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.crypto import MasterKey
from core.errors import DisputeRejected, NotFound
from core.events import (
    DisputeAccepted,
    DisputeContested,
    DisputeOutcome,
    DisputeRaised,
    DisputeResolved,
    Envelope,
    Event,
)
from core.keyring import SealedColumn
from core.outbox import append_to_outbox
from core.polling import PollingWorker
from core.storage import Database, sql_text
from payments.npci.switch import DisputeNotice, SwitchClient

__all__ = [
    "Dispute",
    "DisputeStatus",
    "DisputeWatcher",
    "Step",
    "accept_dispute",
    "contest_dispute",
    "dispute_views",
    "get_dispute",
    "list_disputes",
    "steps_for",
]

_log = logging.getLogger(__name__)
_FEED_START = datetime(2000, 1, 1, tzinfo=UTC)  # before any complaint: the whole feed


class DisputeStatus(StrEnum):
    OPEN = "OPEN"
    ACCEPTED = "ACCEPTED"
    CONTESTED = "CONTESTED"
    WON = "WON"
    LOST = "LOST"

    @property
    def is_closed(self) -> bool:
        return self in (DisputeStatus.ACCEPTED, DisputeStatus.WON, DisputeStatus.LOST)


_S = DisputeStatus


@dataclass(frozen=True)
class Step:
    """One change to record: ``to`` the new status (``OPEN``: the complaint is new)."""

    to: DisputeStatus
    at: datetime
    auto: bool = False


def steps_for(current: DisputeStatus | None, notice: DisputeNotice) -> list[Step]:
    """What the engine records when the switch reports ``notice`` about a dispute the
    engine holds at ``current`` (None: never seen). Pure; idempotent: a notice already
    applied gives no step. A closed dispute never changes."""
    seen = notice.status
    steps: list[Step] = []
    if current is None:
        steps.append(Step(_S.OPEN, notice.raised_at))
        current = _S.OPEN
    if current.is_closed or seen == current:
        return steps
    decided = notice.decided_at or notice.changed_at
    if seen == _S.ACCEPTED:
        # The switch deemed it accepted (nobody answered by respond_by; or an answer of
        # ours crossed the deadline): a chargeback either way.
        steps.append(Step(_S.ACCEPTED, decided, auto=True))
    elif seen in (_S.WON, _S.LOST):
        steps.append(Step(_S(seen), decided))
    # seen OPEN or CONTESTED while ours is further on: our answer is on its way.
    return steps


def answerable(
    status: DisputeStatus, respond_by: datetime, now: datetime, *, contest: bool
) -> str | None:
    """Why the merchant cannot answer now (a problem code), or None."""
    if status is not _S.OPEN:
        return "dispute_not_open"
    if contest and now >= respond_by:
        return "dispute_overdue"
    return None


@dataclass(frozen=True)
class Dispute:
    dispute_id: str
    transaction_id: str
    merchant_id: str
    amount_paise: int
    reason: str
    status: DisputeStatus
    raised_at: datetime
    respond_by: datetime
    auto_accepted: bool
    documents: tuple[str, ...]
    answered_at: datetime | None
    resolved_at: datetime | None
    payer_bank: str
    payee_bank: str
    partition_key: str = field(default="", repr=False)  # its payment's

    def view(self) -> dict[str, Any]:
        return {
            "dispute_id": self.dispute_id,
            "transaction_id": self.transaction_id,
            "amount_paise": self.amount_paise,
            "reason": self.reason,
            "status": self.status.value,
            "auto_accepted": self.auto_accepted,
            "raised_at": _iso(self.raised_at),
            "respond_by": _iso(self.respond_by),
            "answered_at": _iso(self.answered_at),
            "resolved_at": _iso(self.resolved_at),
            "documents": list(self.documents),
            "chargeback": self.status in (_S.ACCEPTED, _S.LOST),
        }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


_COLUMNS = (
    "d.dispute_id, d.transaction_id, d.merchant_id, d.amount_paise, d.reason, d.status,"
    " d.raised_at, d.respond_by, d.auto_accepted, d.documents, d.answered_at, d.resolved_at,"
    " d.payer_bank, d.payee_bank, p.partition_key"
)
_FROM = " FROM disputes d JOIN payments p ON p.transaction_id = d.transaction_id"


def _dispute(row: Any) -> Dispute:
    return Dispute(
        row.dispute_id,
        row.transaction_id,
        row.merchant_id,
        int(row.amount_paise),
        row.reason,
        DisputeStatus(row.status),
        row.raised_at,
        row.respond_by,
        bool(row.auto_accepted),
        tuple(row.documents or ()),
        row.answered_at,
        row.resolved_at,
        row.payer_bank,
        row.payee_bank,
        row.partition_key,
    )


# --------------------------------------------------------------------------- events


def _event(d: Dispute, step: Step, *, documents: int = 0) -> Event:
    common: dict[str, Any] = {
        "transaction_id": d.transaction_id,
        "merchant_id": d.merchant_id,
        "dispute_id": d.dispute_id,
        "amount_paise": d.amount_paise,
    }
    banks = {"payer_bank": d.payer_bank, "payee_bank": d.payee_bank}
    match step.to:
        case _S.OPEN:
            return DisputeRaised(
                **common, reason=d.reason, raised_at=d.raised_at, respond_by=d.respond_by
            )
        case _S.ACCEPTED:
            return DisputeAccepted(**common, **banks, auto=step.auto, accepted_at=step.at)
        case _S.CONTESTED:
            return DisputeContested(**common, documents=documents, contested_at=step.at)
        case _S.WON | _S.LOST:
            return DisputeResolved(
                **common, **banks, outcome=DisputeOutcome(step.to.value), resolved_at=step.at
            )
    raise AssertionError(step)


async def _publish(
    conn: AsyncConnection, d: Dispute, events: Sequence[Event], at: datetime
) -> None:
    key = d.partition_key
    await append_to_outbox(
        conn, [Envelope.wrap(e, partition_key=key, occurred_at=at) for e in events]
    )


# --------------------------------------------------------------------------- gateway


async def list_disputes(
    db: Database,
    merchant_id: str,
    *,
    status: DisputeStatus | None = None,
    limit: int = 50,
    after: str | None = None,
) -> list[Dispute]:
    """The merchant's disputes, newest first; ``after``: the last ``dispute_id`` of the
    previous page."""
    sql = "SELECT " + _COLUMNS + _FROM + " WHERE d.merchant_id = :m"
    params: dict[str, Any] = {"m": merchant_id, "n": limit}
    if status is not None:
        sql += " AND d.status = :s"
        params["s"] = status.value
    if after is not None:
        sql += (
            " AND (d.raised_at, d.dispute_id) < (SELECT raised_at, dispute_id FROM disputes"
            " WHERE dispute_id = :after AND merchant_id = :m)"
        )
        params["after"] = after
    sql += " ORDER BY d.raised_at DESC, d.dispute_id DESC LIMIT :n"
    async with db.connection() as conn:
        return [_dispute(r) for r in await conn.execute(sql_text(sql), params)]


async def _load(
    conn: AsyncConnection, dispute_id: str, *, for_update: bool = False
) -> Dispute | None:
    sql = "SELECT " + _COLUMNS + _FROM + " WHERE d.dispute_id = :d"
    if for_update:
        sql += " FOR UPDATE OF d"
    row = (await conn.execute(sql_text(sql), {"d": dispute_id})).first()
    return _dispute(row) if row is not None else None


async def dispute_views(
    conn: AsyncConnection, dispute_ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The merchant's view of these disputes, by id (webhook bodies)."""
    rows = await conn.execute(
        sql_text("SELECT " + _COLUMNS + _FROM + " WHERE d.dispute_id = ANY(CAST(:ids AS text[]))"),
        {"ids": list(dispute_ids)},
    )
    return {r.dispute_id: _dispute(r).view() for r in rows}


async def get_dispute(db: Database, merchant_id: str, dispute_id: str) -> Dispute:
    async with db.connection() as conn:
        d = await _load(conn, dispute_id)
    if d is None or d.merchant_id != merchant_id:
        raise NotFound(f"no dispute {dispute_id}")
    return d


async def accept_dispute(db: Database, merchant_id: str, dispute_id: str, clock: Clock) -> Dispute:
    """The merchant accepts: a chargeback now (the watcher tells the switch). Accepting a
    dispute already accepted by the merchant is answered with it as it stands."""
    now = clock.now()
    async with db.transaction() as conn:
        d = await _load(conn, dispute_id, for_update=True)
        if d is None or d.merchant_id != merchant_id:
            raise NotFound(f"no dispute {dispute_id}")
        if d.status is _S.ACCEPTED and not d.auto_accepted:
            return d
        if (why := answerable(d.status, d.respond_by, now, contest=False)) is not None:
            raise DisputeRejected(why, f"dispute {dispute_id} is {d.status}")
        await conn.execute(
            sql_text(
                "UPDATE disputes SET status = 'ACCEPTED', answered_at = :now, resolved_at = :now,"
                " answer_sent = false, updated_at = :now WHERE dispute_id = :d"
            ),
            {"now": now, "d": dispute_id},
        )
        await _publish(conn, d, [_event(d, Step(_S.ACCEPTED, now))], now)
        after = await _load(conn, dispute_id)
    assert after is not None
    return after


async def contest_dispute(
    db: Database,
    master_key: MasterKey,
    merchant_id: str,
    dispute_id: str,
    *,
    evidence: str,
    documents: Sequence[str],
    clock: Clock,
) -> Dispute:
    """The merchant contests with evidence, before ``respond_by``; the switch decides."""
    now = clock.now()
    async with db.transaction() as conn:
        d = await _load(conn, dispute_id, for_update=True)
        if d is None or d.merchant_id != merchant_id:
            raise NotFound(f"no dispute {dispute_id}")
        if (why := answerable(d.status, d.respond_by, now, contest=True)) is not None:
            raise DisputeRejected(
                why,
                f"dispute {dispute_id} is {d.status}"
                if why == "dispute_not_open"
                else f"dispute {dispute_id} had to be answered by {_iso(d.respond_by)}",
            )
        await conn.execute(
            sql_text(
                "UPDATE disputes SET status = 'CONTESTED', answered_at = :now,"
                " evidence_enc = :ev, documents = :docs, answer_sent = false, updated_at = :now"
                " WHERE dispute_id = :d"
            ),
            {
                "now": now,
                "ev": master_key.seal(evidence.encode(), _aad(dispute_id)),
                "docs": list(documents),
                "d": dispute_id,
            },
        )
        await _publish(conn, d, [_event(d, Step(_S.CONTESTED, now), documents=len(documents))], now)
        after = await _load(conn, dispute_id)
    assert after is not None
    return after


def _aad(dispute_id: str) -> bytes:
    return SEALED[0].aad(dispute_id)


# The evidence is sealed under the master key (core/keyring.py re-wraps it).
SEALED = (
    SealedColumn("disputes", "dispute_id", "evidence_enc", "dispute_id", b"dispute-evidence|"),
)


# --------------------------------------------------------------------------- watcher


class DisputeWatcher(PollingWorker):
    """Switch role: the switch's dispute feed in, overdue disputes accepted, answers out."""

    name = "dispute watcher"
    # The feed is read again from this far before the newest change seen, so that a change
    # committed late at the switch is not missed; repeats are harmless (steps_for).
    OVERLAP = timedelta(seconds=30)

    def __init__(
        self,
        db: Database,
        switch: SwitchClient,
        master_key: MasterKey,
        clock: Clock,
        *,
        interval_s: float = 1.0,
        answer_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(interval_s)
        self._db = db
        self._switch = switch
        self._key = master_key
        self._clock = clock
        self._answer_timeout_s = answer_timeout_s

    async def step(self) -> int:
        return await self.read_feed() + await self.accept_overdue() + await self.send_answers()

    async def read_feed(self) -> int:
        async with self._db.connection() as conn:
            seen = (
                await conn.execute(sql_text("SELECT seen_until FROM dispute_feed WHERE id = 1"))
            ).scalar_one_or_none()
        since = seen - self.OVERLAP if seen is not None else _FEED_START
        notices = await self._switch.dispute_updates(since)
        if not notices:
            return 0
        recorded = 0
        now = self._clock.now()
        async with self._db.transaction() as conn:
            ids = [n.dispute_id for n in notices]
            current = {
                r.dispute_id: DisputeStatus(r.status)
                for r in await conn.execute(
                    sql_text(
                        "SELECT dispute_id, status FROM disputes"
                        " WHERE dispute_id = ANY(CAST(:ids AS text[]))"
                        " ORDER BY dispute_id FOR UPDATE"
                    ),
                    {"ids": ids},
                )
            }
            for notice in notices:
                steps = steps_for(current.get(notice.dispute_id), notice)
                if steps and await self._apply(conn, notice, steps, now):
                    recorded += len(steps)
                    current[notice.dispute_id] = steps[-1].to
            newest = max(n.changed_at for n in notices)
            await conn.execute(
                sql_text(
                    "INSERT INTO dispute_feed (id, seen_until) VALUES (1, :at) ON CONFLICT (id)"
                    " DO UPDATE SET seen_until"
                    " = GREATEST(dispute_feed.seen_until, EXCLUDED.seen_until)"
                ),
                {"at": newest},
            )
        return recorded

    async def _apply(
        self, conn: AsyncConnection, notice: DisputeNotice, steps: Sequence[Step], now: datetime
    ) -> bool:
        if steps[0].to is _S.OPEN:
            payment = (
                await conn.execute(
                    sql_text("SELECT merchant_id FROM payments WHERE transaction_id = :t"),
                    {"t": notice.txn_id},
                )
            ).first()
            if payment is None:
                _log.warning(
                    "dispute for a payment this engine does not hold: ignored",
                    extra={"transaction_id": notice.txn_id, "dispute_id": notice.dispute_id},
                )
                return False
            await conn.execute(
                sql_text(
                    "INSERT INTO disputes (dispute_id, transaction_id, merchant_id, amount_paise,"
                    " reason, status, raised_at, respond_by, payer_bank, payee_bank, created_at,"
                    " updated_at) VALUES (:d, :t, :m, :a, :r, 'OPEN', :at, :by, :pb, :eb, :now,"
                    " :now) ON CONFLICT (dispute_id) DO NOTHING"
                ),
                {
                    "d": notice.dispute_id,
                    "t": notice.txn_id,
                    "m": payment.merchant_id,
                    "a": notice.amount_paise,
                    "r": notice.reason,
                    "at": notice.raised_at,
                    "by": notice.respond_by,
                    "pb": notice.payer_bank,
                    "eb": notice.payee_bank,
                    "now": now,
                },
            )
        d = await _load(conn, notice.dispute_id)
        assert d is not None
        events = []
        for step in steps:
            if step.to is not _S.OPEN:
                await conn.execute(
                    sql_text(
                        "UPDATE disputes SET status = :s, auto_accepted = auto_accepted OR :auto,"
                        " resolved_at = :at, answer_sent = true, updated_at = :now"
                        " WHERE dispute_id = :d"
                    ),
                    {
                        "s": step.to.value,
                        "auto": step.auto,
                        "at": step.at,
                        "now": now,
                        "d": d.dispute_id,
                    },
                )
            events.append(_event(d, step))
        await _publish(conn, d, events, now)
        return True

    async def accept_overdue(self, limit: int = 100) -> int:
        """``OPEN`` past ``respond_by`` here: accepted, as the switch deems it too."""
        now = self._clock.now()
        async with self._db.transaction() as conn:
            rows = (
                await conn.execute(
                    sql_text(
                        "SELECT "
                        + _COLUMNS
                        + _FROM
                        + " WHERE d.status = 'OPEN' AND d.respond_by <= :now"
                        " ORDER BY d.respond_by LIMIT :n FOR UPDATE OF d SKIP LOCKED"
                    ),
                    {"now": now, "n": limit},
                )
            ).all()
            for row in rows:
                d = _dispute(row)
                await conn.execute(
                    sql_text(
                        "UPDATE disputes SET status = 'ACCEPTED', auto_accepted = true,"
                        " resolved_at = respond_by, answer_sent = false, updated_at = :now"
                        " WHERE dispute_id = :d"
                    ),
                    {"now": now, "d": d.dispute_id},
                )
                await _publish(
                    conn, d, [_event(d, Step(_S.ACCEPTED, d.respond_by, auto=True))], now
                )
        return len(rows)

    async def send_answers(self, limit: int = 50) -> int:
        """The answers recorded and not yet delivered, to the switch (idempotent there)."""
        async with self._db.connection() as conn:
            rows = (
                await conn.execute(
                    sql_text(
                        "SELECT dispute_id, status, evidence_enc, documents FROM disputes"
                        " WHERE NOT answer_sent ORDER BY answered_at NULLS FIRST LIMIT :n"
                    ),
                    {"n": limit},
                )
            ).all()
        sent = 0
        for row in rows:
            accept = row.status == _S.ACCEPTED.value
            evidence = (
                self._key.open(bytes(row.evidence_enc), _aad(row.dispute_id)).decode()
                if row.evidence_enc is not None
                else None
            )
            notice = await asyncio.wait_for(
                self._switch.answer_dispute(
                    row.dispute_id,
                    accept=accept,
                    evidence=evidence,
                    documents=tuple(row.documents or ()),
                ),
                self._answer_timeout_s,
            )
            now = self._clock.now()
            async with self._db.transaction() as conn:
                await conn.execute(
                    sql_text("UPDATE disputes SET answer_sent = true WHERE dispute_id = :d"),
                    {"d": row.dispute_id},
                )
                # The switch's word stands: an answer that crossed its deadline was deemed
                # accepted there.
                status = DisputeStatus(row.status)
                steps = steps_for(status, notice)
                if steps:
                    await self._apply(conn, notice, steps, now)
            sent += 1
        return sent

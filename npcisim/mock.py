"""The mock NPCI switch — the only mock in the product, by design (SPEC §5).

It behaves like the switch plus the banks behind it:

* payer accounts with balances, provisioned deterministically from the VPA
  (:func:`opening_balance`) so tests can predict them;
* per-bank latency (lognormal) and business decline rates from ``profiles.json``;
* 12-digit RRNs and real UPI response codes (:mod:`payments.npci.codes`);
* a journal of every transaction (``npci_sim.transactions``), whose settlement data
  (:meth:`MockSwitch.settlement_data`) settlement reconciles against; its state is in
  PostgreSQL, in its own schema ``npci_sim``, so it survives restarts, as NPCI's would;
* check-status, credit reversal, refund credit;
* faults injectable at run time per bank: extra latency, timeout rate, error rate, down
  (a bank that is down also cannot take a reversal back: ``96``), late success rate;
* NPCI's API rules (:mod:`payments.npci.rules`): a check-status before 90 s after the pay
  request, or past 3 answered within 2 hours, is refused with a rate-limit answer
  (:class:`~core.errors.SwitchRateLimited`, HTTP 429) and counted in
  ``npci_mock_api_violations_total{api}``. Every check-status and reversal call is kept in
  its journal of calls (``npci_sim.api_calls``), so the timeline can be read back
  (:meth:`MockSwitch.calls`).

Time is the injected :class:`~core.clock.Clock`'s (the engine's, in process), and
``time_scale`` (``UPI_NPCI_TIME_SCALE``) multiplies every NPCI timer and rule window of the
switch at once: its pending and hang times and the check-status rule.

Sandbox payers (whatever their handle), by local part: ``success`` → ``00``;
``insufficient`` → ``Z9``; ``wrongpin`` → ``ZM``; ``bank-down`` → ``XY`` (remitter bank
offline); ``timeout-success`` / ``timeout-failure`` → the pay request is processed (debited /
failed with ``U30``) but its answer never comes back in time; check-status says ``01``
(pending) for ``pending_s`` and then the real outcome; ``late-success`` → a late success:
the payer's bank debits, but the switch answers ``U30`` (debit failed) and its books show
the debit only ``late_s`` later (check-status says ``U30`` until then, ``00`` after, and the
journal counts the debit from then). The fault ``late_success_rate`` does the same to that
share of a bank's payments, for drills.

A pay request repeating a txn id never debits again: the journal row is inserted first,
keyed by txn id, in the same transaction as the balance changes; a repeat gets the first
answer. A reversal of a txn id the switch never saw leaves a void row, so a late pay
request with that id is refused rather than debited.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from importlib import resources
from typing import Any, Generic, TypeVar

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import IST, Clock, SystemClock
from core.errors import SwitchError, SwitchRateLimited
from core.ids import new_rrn
from core.money import Paise
from core.storage import Database, sql_text
from npcisim.disputes import DisputeDesk, DisputeRules, SuccessfulPay
from payments.npci.banks import bank_of
from payments.npci.rules import CHECK_STATUS_RULE, Refusal
from payments.npci.switch import (
    DisputeNotice,
    PayRequest,
    RefundRequest,
    ReversalResult,
    SettlementRecord,
    SwitchResult,
)

__all__ = [
    "API_VIOLATIONS",
    "LATE_SUCCESS_ANSWER",
    "BankProfile",
    "Faults",
    "JournalCall",
    "MockSwitch",
    "load_profiles",
    "opening_balance",
]

# The switch's count of calls it refused for breaking NPCI's API rules. The engine plans its
# calls so that this stays 0. Children made now, so that a scrape shows the 0.
API_VIOLATIONS = Counter(
    "npci_mock_api_violations_total",
    "Calls the mock NPCI switch refused for breaking NPCI's API rules",
    ["api"],
)
API_VIOLATIONS.labels("check_status")

SANDBOX_CODES = {
    "success": "00",
    "insufficient": "Z9",
    "wrongpin": "ZM",
    "bank-down": "XY",
    "timeout-success": "00",
    "timeout-failure": "U30",
    "dispute": "00",  # succeeds; the payer complains a few seconds later
    "late-success": "00",  # debited; answered LATE_SUCCESS_ANSWER until late_s after
}
_HANGS = {"timeout-success", "timeout-failure"}
_LATE = {"late-success"}
# What the switch answers for a late success until its debit shows (debit failed).
LATE_SUCCESS_ANSWER = "U30"
# Sandbox payers always have money: their outcome is fixed by name, not by balance.
_SANDBOX_BALANCE = 10**15


def opening_balance(vpa: str) -> Paise:
    """Deterministic opening balance: ₹1,000 .. ₹5,00,000 from a hash of the VPA."""
    if vpa.split("@", 1)[0] in SANDBOX_CODES:
        return _SANDBOX_BALANCE
    h = int.from_bytes(hashlib.sha256(vpa.lower().encode()).digest()[:8], "big")
    return 100_000 + h % (50_000_000 - 100_000)


@dataclass(frozen=True)
class BankProfile:
    latency_median_ms: float = 120.0
    latency_sigma: float = 0.5
    decline_rate: float = 0.02
    decline_codes: dict[str, float] = field(default_factory=lambda: {"U30": 1.0})
    dispute_rate: float = 0.0  # the share of successful payments a complaint follows


@dataclass
class Faults:
    """Injected at run time, per bank (the payer's bank is the one that matters)."""

    extra_latency_ms: float = 0.0
    timeout_rate: float = 0.0  # answer processed but never returned in time
    error_rate: float = 0.0  # refused before processing (HTTP 503 from the switch)
    down: bool = False  # remitter bank offline: XY
    dispute_rate: float = 0.0  # the share of successful payments its payers complain about
    # debited, but answered U30 (debit failed); the debit shows late_s later: late success
    late_success_rate: float = 0.0


def load_profiles(raw: dict[str, Any] | None = None) -> dict[str, BankProfile]:
    if raw is None:
        raw = json.loads(resources.files("npcisim").joinpath("profiles.json").read_text())
    default = {k: v for k, v in raw["default"].items()}
    profiles = {"default": BankProfile(**default)}
    for bank, overrides in raw.get("banks", {}).items():
        profiles[bank] = BankProfile(**{**default, **overrides})
    return profiles


_T = TypeVar("_T")
_log = logging.getLogger(__name__)


def _log_failure_nobody_awaits(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.warning("mock switch: a request failed after its caller stopped waiting: %r", exc)


@dataclass(frozen=True)
class JournalCall:
    """One call of a transaction, as the switch's journal of calls has it."""

    api: str  # pay, check_status, reversal
    at: datetime
    outcome: str  # answered, or the Refusal that refused it


@dataclass(frozen=True)
class _Pay:
    """A pay request as it reached the switch."""

    request: PayRequest
    payer_bank: str | None
    payee_bank: str | None
    fault: Faults
    visible_at: datetime
    arrived_at: datetime
    late_at: datetime | None = None  # a late success: its debit shows from then


_I = TypeVar("_I")
_R = TypeVar("_R")


class _Coalescer(Generic[_I, _R]):
    """Requests that arrive in the same turn of the event loop are processed together,
    by one call of ``process`` (each caller gets its own result, or the batch's error)."""

    def __init__(self, process: Callable[[Sequence[_I]], Awaitable[list[_R]]]) -> None:
        self._process = process
        self._waiting: list[tuple[_I, asyncio.Future[_R]]] = []
        self._running: set[asyncio.Future[None]] = set()  # held: the loop keeps weak refs

    async def submit(self, item: _I) -> _R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._start)
        self._waiting.append((item, future))
        return await future

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[_I, asyncio.Future[_R]]]) -> None:
        try:
            results = await self._process([item for item, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


class MockSwitch:
    def __init__(
        self,
        db: Database,
        *,
        profiles: dict[str, BankProfile] | None = None,
        latency_scale: float = 1.0,
        decline_scale: float = 1.0,
        hang_s: float = 30.0,
        pending_s: float = 5.0,
        seed: int | None = None,
        clock: Clock | None = None,
        time_scale: float = 1.0,
        dispute_rules: DisputeRules | None = None,
        late_s: float = 60.0,
    ) -> None:
        """``hang_s``, ``pending_s``, ``late_s``, NPCI's check-status rule and the dispute
        rules are at NPCI's own pace; ``time_scale`` multiplies them all."""
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self._db = db
        self._profiles = profiles or load_profiles()
        self._latency_scale = latency_scale
        self._decline_scale = decline_scale
        self._clock: Clock = clock or SystemClock()
        self.time_scale = time_scale
        self.hang_s = hang_s * time_scale
        self.pending_s = pending_s * time_scale
        self.late_s = late_s * time_scale
        self.check_status_rule = CHECK_STATUS_RULE.scaled(time_scale)
        self._rng = random.Random(seed)  # latency
        self._fault_rng = random.Random(seed)  # which calls an injected fault hits
        self.faults: dict[str, Faults] = {}
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._pays: _Coalescer[_Pay, tuple[SwitchResult, bool]] = _Coalescer(self._record_pays)
        self.disputes = DisputeDesk(
            db, self._clock, (dispute_rules or DisputeRules()).scaled(time_scale), seed
        )

    # ----------------------------------------------------------------- faults

    def inject(self, bank: str, **faults: Any) -> Faults:
        current = self.faults.get(bank, Faults())
        updated = Faults(**{**current.__dict__, **faults})
        self.faults[bank] = updated
        return updated

    def reseed(self, seed: int) -> None:
        """Make the draws of injected faults repeatable (for drills and tests)."""
        self._fault_rng.seed(seed)

    def clear_faults(self, bank: str | None = None) -> None:
        if bank is None:
            self.faults.clear()
        else:
            self.faults.pop(bank, None)

    # ----------------------------------------------------------------- helpers

    def _profile(self, bank: str | None) -> BankProfile:
        return self._profiles.get(bank or "", self._profiles["default"])

    async def _latency(self, bank: str | None, *, with_faults: bool = True) -> None:
        profile = self._profile(bank)
        fault = self.faults.get(bank or "") if with_faults else None
        ms = profile.latency_median_ms * math.exp(self._rng.gauss(0, profile.latency_sigma))
        ms = ms * self._latency_scale + (fault.extra_latency_ms if fault else 0.0)
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    def _business_decline(self, request: PayRequest, bank: str) -> str | None:
        """A payer-side decline (wrong PIN, declined by customer…), decided per txn id."""
        profile = self._profile(bank)
        rate = profile.decline_rate * self._decline_scale
        if rate <= 0:
            return None
        draw = random.Random(request.txn_id)  # the same txn always draws the same
        if draw.random() >= rate:
            return None
        codes, weights = zip(*profile.decline_codes.items(), strict=True)
        return str(draw.choices(codes, weights)[0])

    # ----------------------------------------------------------------- requests received

    async def _received(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work``, what the switch does with a request that reached it, to its end
        even when the caller stops waiting (its leg timed out): NPCI goes on processing a
        request whose answer is lost, and a later check-status finds the result. Cancelling
        it instead would also cut its database transaction short mid-statement."""
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_failure_nobody_awaits)
            raise

    async def close(self, wait_s: float = 5.0) -> None:
        """Let the requests already received finish, before the database goes."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=wait_s)

    # ----------------------------------------------------------------- operations

    async def pay(self, request: PayRequest) -> SwitchResult:
        """The request reaches the switch (after an injected ``extra_latency_ms``: a request
        delayed past the caller's leg may never be seen), is processed, and the answer comes
        back after the bank's latency. Requests that arrive together are processed in one
        transaction (:meth:`_record_pays`), as a switch batches its journal writes."""
        payer_bank = bank_of(request.payer_vpa)
        payee_bank = bank_of(request.payee_vpa)
        fault = self.faults.get(payer_bank or "", Faults())
        if fault.extra_latency_ms > 0:
            await asyncio.sleep(fault.extra_latency_ms / 1000)
        if fault.error_rate and self._fault_rng.random() < fault.error_rate:
            await self._latency(payer_bank, with_faults=False)
            raise SwitchError("switch answered 503: service unavailable (nothing processed)")
        local = request.payer_vpa.split("@", 1)[0]
        hangs = local in _HANGS or (
            fault.timeout_rate > 0 and self._fault_rng.random() < fault.timeout_rate
        )
        late = local in _LATE or (
            fault.late_success_rate > 0 and self._fault_rng.random() < fault.late_success_rate
        )
        now = self._clock.now()
        visible_at = now + timedelta(seconds=self.pending_s) if hangs else now
        late_at = visible_at + timedelta(seconds=self.late_s) if late else None
        arrival = _Pay(request, payer_bank, payee_bank, fault, visible_at, now, late_at)
        result, first_time = await self._received(self._pays.submit(arrival))
        await self._latency(payer_bank, with_faults=False)
        if hangs and first_time:
            # Processed, but the answer is lost on the way back: the caller times out.
            await asyncio.sleep(self.hang_s)
            return SwitchResult(request.txn_id, "01", result.rrn, payer_bank, payee_bank)
        return result

    async def _record_pays(self, pays: Sequence[_Pay]) -> list[tuple[SwitchResult, bool]]:
        """Pay requests in the journal and the money moved, in one transaction; each with
        False for a repeat (of an earlier request, or of one before it in ``pays``).

        The journal rows are inserted first, keyed by txn id, so a repeat never debits
        again; the accounts touched are locked in one statement (in VPA order), the money
        moves in arrival order in memory, and the balances and answers are written back
        set-based."""
        async with self._db.transaction() as conn:
            rrns = {p.request.txn_id: new_rrn() for p in pays}
            firsts = {
                txn: i for i, txn in reversed(list(enumerate(p.request.txn_id for p in pays)))
            }
            unique = [pays[i] for i in sorted(firsts.values())]
            inserted = {
                row.txn_id: row.rrn
                for row in await conn.execute(
                    _JOURNAL_PAYS,
                    {
                        "t": [p.request.txn_id for p in unique],
                        "payer": [p.request.payer_vpa for p in unique],
                        "payee": [p.request.payee_vpa for p in unique],
                        "pb": [p.payer_bank or "UNKNOWN" for p in unique],
                        "eb": [p.payee_bank or "UNKNOWN" for p in unique],
                        "amt": [p.request.amount_paise for p in unique],
                        "rrn": [rrns[p.request.txn_id] for p in unique],
                        "vis": [p.visible_at for p in unique],
                        "at": [p.arrived_at for p in unique],
                        "late": [p.late_at for p in unique],
                    },
                )
            }
            fresh = [p for p in unique if p.request.txn_id in inserted]
            codes = {p.request.txn_id: self._decide(p) for p in fresh}
            moving = [p for p in fresh if codes[p.request.txn_id] is None]
            if moving:
                balances = await _lock_accounts(conn, moving)
                for p in moving:  # in arrival order: one payer's payments one after another
                    r = p.request
                    if balances[r.payer_vpa] >= r.amount_paise:
                        balances[r.payer_vpa] -= r.amount_paise
                        balances[r.payee_vpa] += r.amount_paise
                        codes[r.txn_id] = "00"
                    else:
                        codes[r.txn_id] = "Z9"
                await conn.execute(
                    _SET_BALANCES, {"v": list(balances), "b": list(balances.values())}
                )
            if fresh:
                settled = [codes[p.request.txn_id] or "00" for p in fresh]
                await conn.execute(
                    _SETTLE_JOURNAL,
                    {
                        "t": [p.request.txn_id for p in fresh],
                        "s": ["SUCCESS" if c == "00" else "FAILED" for c in settled],
                        "c": settled,
                    },
                )
                succeeded = [p for p, c in zip(fresh, settled, strict=True) if c == "00"]
                if succeeded:
                    await self.disputes.after_payments(
                        conn, [self._complaint_chance(p) for p in succeeded]
                    )
            repeats = {p.request.txn_id for p in pays} - set(inserted)
            now = self._clock.now()
            earlier = await _journal_results(conn, sorted(repeats), now) if repeats else {}
        results: list[tuple[SwitchResult, bool]] = []
        for i, p in enumerate(pays):
            txn = p.request.txn_id
            if txn in inserted and firsts[txn] == i:
                code = codes[txn] or "00"
                if code == "00" and p.late_at is not None:
                    code = LATE_SUCCESS_ANSWER  # debited; the switch does not know it yet
                answer = SwitchResult(txn, code, inserted[txn], p.payer_bank, p.payee_bank)
                results.append((answer, True))
            elif txn in inserted:  # the same txn id twice in this batch: the first answer
                results.append((results[firsts[txn]][0], False))
            else:
                results.append((earlier[txn], False))
        return results

    def _complaint_chance(self, pay: _Pay) -> SuccessfulPay:
        r = pay.request
        if r.payer_vpa.split("@", 1)[0] == "dispute":
            rate = 1.0
        else:
            rate = max(
                pay.fault.dispute_rate,
                self._profile(pay.payer_bank).dispute_rate * self._decline_scale,
            )
        return SuccessfulPay(
            r.txn_id,
            r.payer_vpa,
            r.payee_vpa,
            pay.payer_bank or "UNKNOWN",
            pay.payee_bank or "UNKNOWN",
            r.amount_paise,
            min(rate, 1.0),
        )

    def _decide(self, pay: _Pay) -> str | None:
        """The answer decided before any money moves; None: move the money."""
        request, payer_bank, payee_bank = pay.request, pay.payer_bank, pay.payee_bank
        if payer_bank is None or payee_bank is None:
            return "ZH"
        local = request.payer_vpa.split("@", 1)[0]
        sandbox = SANDBOX_CODES.get(local)
        if pay.fault.down or sandbox == "XY":
            return "XY"
        if sandbox is not None and sandbox != "00":
            return sandbox
        if sandbox is None:
            return self._business_decline(request, payer_bank)
        return None

    async def check_status(self, txn_id: str) -> SwitchResult:
        """ReqChkTxn, under NPCI's rule: refused (:class:`SwitchRateLimited`, counted in
        ``npci_mock_api_violations_total``) before ``first_after_s`` after the pay request
        and once ``max_calls`` were answered within ``window_s``. Every call is journaled."""
        await self._latency(None)
        answer, refused = await self._received(self._check_status(txn_id))
        if refused is not None:
            API_VIOLATIONS.labels("check_status").inc()
            raise refused
        assert answer is not None
        return answer

    async def _check_status(
        self, txn_id: str
    ) -> tuple[SwitchResult | None, SwitchRateLimited | None]:
        rule = self.check_status_rule
        async with self._db.transaction() as conn:
            # One transaction's calls one after another, so that two at once cannot both
            # take its last call of the budget.
            await conn.execute(_LOCK_CALLS, {"k": f"npci-check-status:{txn_id}"})
            now = self._clock.now()
            row = (
                await conn.execute(
                    sql_text(_JOURNAL_READ + " WHERE txn_id = :t"), {"t": txn_id, "now": now}
                )
            ).first()
            answered = list(
                (
                    await conn.execute(
                        sql_text(
                            "SELECT called_at FROM npci_sim.api_calls WHERE txn_id = :t"
                            " AND api = 'check_status' AND outcome = 'answered'"
                            " AND called_at >= :since ORDER BY called_at"
                        ),
                        {"t": txn_id, "since": now - timedelta(seconds=rule.window_s)},
                    )
                ).scalars()
            )
            requested_at = row.created_at if row is not None and row.status != "VOID" else None
            refusal = rule.refusal(requested_at, answered, now)
            await conn.execute(
                _RECORD_CALL,
                {
                    "t": txn_id,
                    "api": "check_status",
                    "at": now,
                    "o": refusal.value if refusal else "answered",
                },
            )
        if refusal is None:
            return _journal_answer(txn_id, row), None
        if refusal is Refusal.TOO_EARLY:
            assert requested_at is not None
            ready = requested_at + timedelta(seconds=rule.first_after_s)
            detail = f"first check-status allowed {rule.first_after_s:g} s after the pay request"
        else:
            ready = answered[-rule.max_calls] + timedelta(seconds=rule.window_s)
            detail = f"{rule.max_calls} check-status calls within {rule.window_s:g} s already"
        retry_after = max(0.0, (ready - now).total_seconds())
        return None, SwitchRateLimited("check_status", f"{refusal.value}: {detail}", retry_after)

    async def calls(self, txn_id: str) -> list[JournalCall]:
        """The journal of one transaction's calls, in time order: its pay request (as the
        switch first received it), then every check-status and reversal, refused or not."""
        async with self._db.connection() as conn:
            rows = await conn.execute(
                sql_text(
                    "SELECT 'pay' AS api, created_at AS at, 'answered' AS outcome, 0 AS id"
                    " FROM npci_sim.transactions WHERE txn_id = :t AND kind = 'PAY'"
                    " AND status <> 'VOID'"
                    " UNION ALL SELECT api, called_at, outcome, id FROM npci_sim.api_calls"
                    " WHERE txn_id = :t ORDER BY at, id"
                ),
                {"t": txn_id},
            )
            return [JournalCall(r.api, r.at, r.outcome) for r in rows]

    async def reverse(self, txn_id: str) -> ReversalResult:
        await self._latency(None)
        return await self._received(self._reverse(txn_id))

    async def _reverse(self, txn_id: str) -> ReversalResult:
        now = self._clock.now()
        async with self._db.transaction() as conn:
            await conn.execute(
                _RECORD_CALL, {"t": txn_id, "api": "reversal", "at": now, "o": "answered"}
            )
            row = (await conn.execute(_REVERSAL_READ, {"t": txn_id, "now": now})).first()
            if row is None:
                # Never seen: void the id so that a late request cannot debit.
                voided = (
                    await conn.execute(
                        sql_text(
                            "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa,"
                            " payer_bank, payee_bank, amount_paise, status, response_code, rrn,"
                            " debited, created_at) VALUES (:t, 'PAY', 'void@void', 'void@void',"
                            " 'NONE', 'NONE', 1, 'VOID', '21', :rrn, false, :now)"
                            " ON CONFLICT DO NOTHING RETURNING 1"
                        ),
                        {"t": txn_id, "rrn": new_rrn(), "now": now},
                    )
                ).first()
                if voided is not None:
                    return ReversalResult(txn_id, "21", reversed=False)
                # A pay request committed while we were voiding: it won, reverse it.
                row = (await conn.execute(_REVERSAL_READ, {"t": txn_id, "now": now})).one()
            if row.status == "REVERSED":
                return ReversalResult(txn_id, "00", reversed=True)
            # A late success whose debit does not show yet: the switch knows of no debit.
            if not row.debited or row.late:
                await conn.execute(
                    sql_text(
                        "UPDATE npci_sim.transactions SET visible_at = :now, updated_at = now()"
                        " WHERE txn_id = :t"
                    ),
                    {"t": txn_id, "now": now},
                )
                return ReversalResult(txn_id, "21", reversed=False)
            fault = self.faults.get(bank_of(row.payer_vpa) or "")
            if fault is not None and fault.down:  # the payer's bank cannot take it back now
                return ReversalResult(txn_id, "96", reversed=False)
            if not await _move(conn, row.payee_vpa, row.payer_vpa, int(row.amount_paise)):
                return ReversalResult(txn_id, "96", reversed=False)
            await conn.execute(
                sql_text(
                    "UPDATE npci_sim.transactions SET status = 'REVERSED', debited = false,"
                    " visible_at = :now, updated_at = now() WHERE txn_id = :t"
                ),
                {"t": txn_id, "now": now},
            )
            return ReversalResult(txn_id, "00", reversed=True)

    async def refund(self, request: RefundRequest) -> SwitchResult:
        payer_bank = bank_of(request.payer_vpa)
        payee_bank = bank_of(request.payee_vpa)
        await self._latency(payee_bank)
        return await self._received(self._refund(request, payer_bank, payee_bank))

    async def _refund(
        self, request: RefundRequest, payer_bank: str | None, payee_bank: str | None
    ) -> SwitchResult:
        async with self._db.transaction() as conn:
            inserted = (
                await conn.execute(
                    sql_text(
                        "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa,"
                        " payer_bank, payee_bank, amount_paise, status, response_code, rrn,"
                        " debited, original_txn_id, created_at) VALUES (:t, 'REFUND', :payer,"
                        " :payee, :pb, :eb, :amt, 'PROCESSING', '01', :rrn, false, :orig, :now)"
                        " ON CONFLICT (txn_id) DO NOTHING RETURNING rrn"
                    ),
                    {
                        "now": self._clock.now(),
                        "t": request.refund_id,
                        "payer": request.payer_vpa,
                        "payee": request.payee_vpa,
                        "pb": payer_bank or "UNKNOWN",
                        "eb": payee_bank or "UNKNOWN",
                        "amt": request.amount_paise,
                        "rrn": new_rrn(),
                        "orig": request.original_txn_id,
                    },
                )
            ).first()
            if inserted is None:
                return await _journal_result(conn, request.refund_id, self._clock.now())
            code = "ZH"
            if payer_bank and payee_bank:
                await _ensure_account(conn, request.payer_vpa, payer_bank)
                await _ensure_account(conn, request.payee_vpa, payee_bank)
                moved = await _move(
                    conn, request.payee_vpa, request.payer_vpa, request.amount_paise
                )
                code = "00" if moved else "Z9"
            await _settle_journal(conn, request.refund_id, code)
            return SwitchResult(request.refund_id, code, inserted.rrn, payer_bank, payee_bank)

    async def dispute_updates(self, since: datetime, limit: int = 500) -> list[DisputeNotice]:
        return await self.disputes.updates(since, limit)

    async def answer_dispute(
        self,
        dispute_id: str,
        *,
        accept: bool,
        evidence: str | None = None,
        documents: Sequence[str] = (),
    ) -> DisputeNotice:
        return await self.disputes.answer(
            dispute_id, accept=accept, evidence=evidence, documents=documents
        )

    async def raise_dispute(self, txn_id: str, reason: str = "goods_not_received") -> DisputeNotice:
        """A payer's complaint about ``txn_id`` now (drills and tests)."""
        return await self.disputes.raise_dispute(txn_id, reason)

    async def settlement_data(
        self, business_date: date, references: Sequence[str]
    ) -> list[SettlementRecord]:
        """The switch's settlement data for an IST date (the port's
        :meth:`~payments.npci.switch.SettlementData.settlement_data`), from its journal."""
        start = datetime.combine(business_date, time(), tzinfo=IST)
        end = start + timedelta(days=1)
        async with self._db.connection() as conn:
            # A late success's debit is the switch's from late_at: in the data of the date
            # it showed, not before.
            result = await conn.execute(
                sql_text(
                    "SELECT txn_id, kind, amount_paise, payer_vpa,"
                    " debited AND (late_at IS NULL OR late_at < :end) AS debited"
                    " FROM npci_sim.transactions WHERE txn_id = ANY(:refs) OR (debited"
                    " AND coalesce(late_at, created_at) >= :start"
                    " AND coalesce(late_at, created_at) < :end) ORDER BY txn_id"
                ),
                {"refs": list(references), "start": start, "end": end},
            )
            return [
                SettlementRecord(
                    r.txn_id, r.kind, int(r.amount_paise), bool(r.debited), r.payer_vpa
                )
                for r in result
            ]

    async def balance(self, vpa: str) -> Paise:
        """An account's balance as its bank sees it (opening balance if never touched)."""
        async with self._db.connection() as conn:
            row = (
                await conn.execute(
                    sql_text("SELECT balance_paise FROM npci_sim.accounts WHERE vpa = :v"),
                    {"v": vpa},
                )
            ).scalar_one_or_none()
        return int(row) if row is not None else opening_balance(vpa)


_JOURNAL_PAYS = sql_text(
    "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa, payer_bank, payee_bank,"
    " amount_paise, status, response_code, rrn, debited, visible_at, created_at, late_at)"
    " SELECT t, 'PAY', payer, payee, pb, eb, amt, 'PROCESSING', '01', rrn, false, vis, at, late"
    " FROM unnest(CAST(:t AS text[]), CAST(:payer AS text[]), CAST(:payee AS text[]),"
    " CAST(:pb AS text[]), CAST(:eb AS text[]), CAST(:amt AS bigint[]), CAST(:rrn AS text[]),"
    " CAST(:vis AS timestamptz[]), CAST(:at AS timestamptz[]), CAST(:late AS timestamptz[]))"
    " AS u(t, payer, payee, pb, eb, amt, rrn, vis, at, late)"
    " ON CONFLICT (txn_id) DO NOTHING RETURNING txn_id, rrn"
)
_ENSURE_ACCOUNTS = sql_text(
    "INSERT INTO npci_sim.accounts (vpa, bank, balance_paise)"
    " SELECT * FROM unnest(CAST(:v AS text[]), CAST(:b AS text[]), CAST(:bal AS bigint[]))"
    " ON CONFLICT (vpa) DO NOTHING"
)
_LOCK_ACCOUNTS = sql_text(
    "SELECT vpa, balance_paise FROM npci_sim.accounts WHERE vpa = ANY(CAST(:v AS text[]))"
    " ORDER BY vpa FOR UPDATE"
)
_SET_BALANCES = sql_text(
    "UPDATE npci_sim.accounts AS a SET balance_paise = u.b"
    " FROM unnest(CAST(:v AS text[]), CAST(:b AS bigint[])) AS u(v, b) WHERE a.vpa = u.v"
)
_SETTLE_JOURNAL = sql_text(
    "UPDATE npci_sim.transactions AS j SET status = u.s, response_code = u.c,"
    " debited = (u.c = '00'), updated_at = now(),"
    " late_at = CASE WHEN u.c = '00' THEN j.late_at END"  # no debit: nothing comes late
    " FROM unnest(CAST(:t AS text[]), CAST(:s AS text[]), CAST(:c AS text[])) AS u(t, s, c)"
    " WHERE j.txn_id = u.t"
)
_JOURNAL_READ = (
    "SELECT txn_id, response_code, rrn, payer_bank, payee_bank, status, created_at,"
    " visible_at > :now AS pending, coalesce(late_at > :now, false) AS late"
    " FROM npci_sim.transactions"
)
_REVERSAL_READ = sql_text(
    "SELECT status, debited, payer_vpa, payee_vpa, amount_paise,"
    " coalesce(late_at > :now, false) AS late FROM npci_sim.transactions"
    " WHERE txn_id = :t FOR UPDATE"
)
_LOCK_CALLS = sql_text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))")
_RECORD_CALL = sql_text(
    "INSERT INTO npci_sim.api_calls (txn_id, api, called_at, outcome) VALUES (:t, :api, :at, :o)"
)


async def _lock_accounts(conn: AsyncConnection, pays: Sequence[_Pay]) -> dict[str, int]:
    """The balances of every account the payments touch (opened if new), rows locked."""
    banks: dict[str, str] = {}
    for p in pays:
        banks.setdefault(p.request.payer_vpa, p.payer_bank or "UNKNOWN")
        banks.setdefault(p.request.payee_vpa, p.payee_bank or "UNKNOWN")
    vpas = sorted(banks)
    await conn.execute(
        _ENSURE_ACCOUNTS,
        {"v": vpas, "b": [banks[v] for v in vpas], "bal": [opening_balance(v) for v in vpas]},
    )
    rows = await conn.execute(_LOCK_ACCOUNTS, {"v": vpas})
    return {row.vpa: int(row.balance_paise) for row in rows}


async def _settle_journal(conn: AsyncConnection, txn_id: str, code: str) -> None:
    """Record the answer of a journal row: ``00`` means the money moved."""
    await conn.execute(
        sql_text(
            "UPDATE npci_sim.transactions SET status = :s, response_code = :c,"
            " debited = :d, updated_at = now() WHERE txn_id = :t"
        ),
        {"s": "SUCCESS" if code == "00" else "FAILED", "c": code, "d": code == "00", "t": txn_id},
    )


async def _ensure_account(conn: AsyncConnection, vpa: str, bank: str) -> None:
    await conn.execute(
        sql_text(
            "INSERT INTO npci_sim.accounts (vpa, bank, balance_paise) VALUES (:v, :b, :bal)"
            " ON CONFLICT (vpa) DO NOTHING"
        ),
        {"v": vpa, "b": bank, "bal": opening_balance(vpa)},
    )


async def _move(conn: AsyncConnection, debit: str, credit: str, amount: Paise) -> bool:
    """Debit one account and credit another, atomically; False if the debit cannot be made."""
    debited = (
        await conn.execute(
            sql_text(
                "UPDATE npci_sim.accounts SET balance_paise = balance_paise - :a"
                " WHERE vpa = :v AND balance_paise >= :a RETURNING 1"
            ),
            {"a": amount, "v": debit},
        )
    ).first()
    if debited is None:
        return False
    await conn.execute(
        sql_text("UPDATE npci_sim.accounts SET balance_paise = balance_paise + :a WHERE vpa = :v"),
        {"a": amount, "v": credit},
    )
    return True


def _journal_answer(txn_id: str, row: Any) -> SwitchResult:
    if row is None:
        return SwitchResult(txn_id, "01", None, None, None, known=False)
    if row.pending or row.status == "PROCESSING":
        return SwitchResult(txn_id, "01", row.rrn, row.payer_bank, row.payee_bank)
    if row.late:  # debited, and the switch does not know it yet
        return SwitchResult(txn_id, LATE_SUCCESS_ANSWER, row.rrn, row.payer_bank, row.payee_bank)
    if row.status == "REVERSED":
        return SwitchResult(txn_id, "RB", row.rrn, row.payer_bank, row.payee_bank)
    return SwitchResult(txn_id, row.response_code, row.rrn, row.payer_bank, row.payee_bank)


async def _journal_result(conn: AsyncConnection, txn_id: str, now: datetime) -> SwitchResult:
    row = (
        await conn.execute(
            sql_text(_JOURNAL_READ + " WHERE txn_id = :t"), {"t": txn_id, "now": now}
        )
    ).first()
    return _journal_answer(txn_id, row)


async def _journal_results(
    conn: AsyncConnection, txn_ids: Sequence[str], now: datetime
) -> dict[str, SwitchResult]:
    rows = {
        row.txn_id: row
        for row in await conn.execute(
            sql_text(_JOURNAL_READ + " WHERE txn_id = ANY(CAST(:ts AS text[]))"),
            {"ts": txn_ids, "now": now},
        )
    }
    return {t: _journal_answer(t, rows.get(t)) for t in txn_ids}

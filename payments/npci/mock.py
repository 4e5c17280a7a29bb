"""The mock NPCI switch — the only mock in the product, by design (SPEC §5).

It behaves like the switch plus the banks behind it: payer accounts with balances
(provisioned deterministically from the VPA so tests can predict them), per-bank latency,
12-digit RRNs, UPI response codes, a journal of every transaction (``npci_transactions``,
which settlement reconciles against), and check-status. Its state is in PostgreSQL so it
survives restarts of the engine, as NPCI's would.

Sandbox payers (whatever their handle), by local part:
``success`` → ``00``; ``insufficient`` → ``Z9``; ``wrongpin`` → ``ZM``; ``bank-down`` →
``XY`` (remitter bank offline). Any other payer is debited if its balance allows, else ``Z9``.

A pay request repeating a txn id never debits again: the journal row is inserted first,
keyed by txn id, in the same transaction as the balance changes, and a repeat gets the
first answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from core.ids import new_rrn
from core.money import Paise
from core.storage import Database
from payments.npci.banks import bank_of
from payments.npci.switch import PayRequest, SwitchResult

__all__ = ["MockSwitch", "opening_balance"]

SANDBOX_CODES = {
    "success": "00",
    "insufficient": "Z9",
    "wrongpin": "ZM",
    "bank-down": "XY",
}
# Sandbox payers always have money: their outcome is fixed by name, not by balance.
_SANDBOX_BALANCE = 10**15


def opening_balance(vpa: str) -> Paise:
    """Deterministic opening balance: ₹1,000 .. ₹5,00,000 from a hash of the VPA."""
    if vpa.split("@", 1)[0] in SANDBOX_CODES:
        return _SANDBOX_BALANCE
    h = int.from_bytes(hashlib.sha256(vpa.lower().encode()).digest()[:8], "big")
    return 100_000 + h % (50_000_000 - 100_000)


class MockSwitch:
    def __init__(self, db: Database, *, latency_ms: tuple[float, float] = (2.0, 20.0)) -> None:
        self._db = db
        self._latency_ms = latency_ms

    async def _latency(self) -> None:
        low, high = self._latency_ms
        if high > 0:
            await asyncio.sleep(random.uniform(low, high) / 1000)

    async def pay(self, request: PayRequest) -> SwitchResult:
        await self._latency()
        payer_bank = bank_of(request.payer_vpa)
        payee_bank = bank_of(request.payee_vpa)
        async with self._db.transaction() as conn:
            inserted = (
                await conn.execute(
                    text(
                        "INSERT INTO npci_transactions (txn_id, kind, payer_vpa, payee_vpa,"
                        " payer_bank, payee_bank, amount_paise, status, response_code, rrn,"
                        " debited) VALUES (:t, 'PAY', :payer, :payee, :pb, :eb, :amt,"
                        " 'PROCESSING', '01', :rrn, false)"
                        " ON CONFLICT (txn_id) DO NOTHING RETURNING rrn"
                    ),
                    {
                        "t": request.txn_id,
                        "payer": request.payer_vpa,
                        "payee": request.payee_vpa,
                        "pb": payer_bank or "UNKNOWN",
                        "eb": payee_bank or "UNKNOWN",
                        "amt": request.amount_paise,
                        "rrn": new_rrn(),
                    },
                )
            ).first()
            if inserted is None:  # a repeat: answer what we answered the first time
                return await _journal_result(conn, request.txn_id)
            code = await self._decide_and_move(conn, request, payer_bank, payee_bank)
            await conn.execute(
                text(
                    "UPDATE npci_transactions SET status = :s, response_code = :c,"
                    " debited = :d, updated_at = now() WHERE txn_id = :t"
                ),
                {
                    "s": "SUCCESS" if code == "00" else "FAILED",
                    "c": code,
                    "d": code == "00",
                    "t": request.txn_id,
                },
            )
            return SwitchResult(request.txn_id, code, inserted.rrn, payer_bank, payee_bank)

    async def _decide_and_move(
        self,
        conn: AsyncConnection,
        request: PayRequest,
        payer_bank: str | None,
        payee_bank: str | None,
    ) -> str:
        if payer_bank is None or payee_bank is None:
            return "ZH"
        sandbox = SANDBOX_CODES.get(request.payer_vpa.split("@", 1)[0])
        if sandbox is not None and sandbox != "00":
            return sandbox
        await _ensure_account(conn, request.payer_vpa, payer_bank)
        await _ensure_account(conn, request.payee_vpa, payee_bank)
        debited = (
            await conn.execute(
                text(
                    "UPDATE npci_accounts SET balance_paise = balance_paise - :a"
                    " WHERE vpa = :v AND balance_paise >= :a RETURNING 1"
                ),
                {"a": request.amount_paise, "v": request.payer_vpa},
            )
        ).first()
        if debited is None:
            return "Z9"
        await conn.execute(
            text("UPDATE npci_accounts SET balance_paise = balance_paise + :a WHERE vpa = :v"),
            {"a": request.amount_paise, "v": request.payee_vpa},
        )
        return "00"

    async def check_status(self, txn_id: str) -> SwitchResult:
        await self._latency()
        async with self._db.transaction() as conn:
            return await _journal_result(conn, txn_id)

    async def balance(self, vpa: str) -> Paise:
        """A payer's balance as the bank sees it (opening balance if never touched)."""
        async with self._db.connection() as conn:
            row = (
                await conn.execute(
                    text("SELECT balance_paise FROM npci_accounts WHERE vpa = :v"), {"v": vpa}
                )
            ).scalar_one_or_none()
        return int(row) if row is not None else opening_balance(vpa)


async def _ensure_account(conn: AsyncConnection, vpa: str, bank: str) -> None:
    await conn.execute(
        text(
            "INSERT INTO npci_accounts (vpa, bank, balance_paise) VALUES (:v, :b, :bal)"
            " ON CONFLICT (vpa) DO NOTHING"
        ),
        {"v": vpa, "b": bank, "bal": opening_balance(vpa)},
    )


async def _journal_result(conn: AsyncConnection, txn_id: str) -> SwitchResult:
    row = (
        await conn.execute(
            text(
                "SELECT response_code, rrn, payer_bank, payee_bank FROM npci_transactions"
                " WHERE txn_id = :t"
            ),
            {"t": txn_id},
        )
    ).first()
    if row is None:
        return SwitchResult(txn_id, "01", None, None, None, known=False)
    return SwitchResult(txn_id, row.response_code, row.rrn, row.payer_bank, row.payee_bank)

"""The one invariant checker: run after every fault test, crash test and drill.

Whatever failed (a killed process, a dead database, a lost connection, a restarted broker),
once the engine is back and has caught up, these hold:

1. every acknowledged payment exists once and has exactly one final status (in the table
   and in its status history), and no payment exists that nobody asked for;
2. no payer is debited twice for one payment: the switch journal has at most one debit per
   payment, a debit only for a SUCCESS payment (or one reversed later), and each payer's
   balance moved by exactly its SUCCESS payments less its refunds;
3. money is conserved at the switch: the balance changes of all accounts sum to 0;
4. refunds never exceed their payment;
5. every event was emitted once, the outbox is drained and every consumer caught up:
   every event is in the ledger, none in dead letters;
6. ``upi-engine ledger verify --full`` passes;
7. no call broke NPCI's API rules: the switch refused no check-status (its journal of
   calls, ``npci_sim.api_calls``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from core.events import Envelope
from core.storage import plain_url
from npcisim.mock import opening_balance
from tests.e2e.harness import cli

FINAL = ("SUCCESS", "FAILED", "BLOCKED", "REVERSED")
_TERMINAL_EVENTS = {"PaymentSucceeded", "PaymentFailed", "PaymentBlocked", "PaymentReversed"}


@dataclass(frozen=True)
class Checked:
    payments: int
    by_status: dict[str, int]
    events: int
    ledger_entries: int


def database_url(env: dict[str, str]) -> str:
    return env.get("UPI_DATABASE_URL") or cli(env, "db", "url").stdout.strip()


def check_invariants(
    env: dict[str, str],
    acknowledged: set[str] | None = None,
    *,
    timeout: float = 60,
    dead_letters_allowed: int = 0,
) -> Checked:
    """Wait (up to ``timeout``) until every payment is final and every consumer caught up,
    then assert the invariants above. ``acknowledged``: the transaction ids that got a 202
    (None: every payment in the database)."""
    url = plain_url(database_url(env))
    checked = asyncio.run(_check(url, acknowledged, timeout, dead_letters_allowed))
    done = cli(env, "ledger", "verify", "--full", "--json", timeout=120)
    assert done.returncode == 0, f"ledger verify --full failed: {done.stdout}{done.stderr}"
    assert orjson.loads(done.stdout)["valid"] is True
    return checked


async def _check(
    url: str, acknowledged: set[str] | None, timeout: float, dead_letters_allowed: int
) -> Checked:
    conn = await asyncpg.connect(url)
    try:
        await _caught_up(conn, timeout)
        return await _assert_all(conn, acknowledged, dead_letters_allowed)
    finally:
        await conn.close()


async def _caught_up(conn: asyncpg.Connection, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = dict(
            await conn.fetchrow(
                "SELECT"
                " (SELECT count(*) FROM payments WHERE status <> ALL($1::text[])) AS open,"
                " (SELECT count(*) FROM outbox o WHERE (o.txid, o.id) > COALESCE("
                "   (SELECT (last_txid, last_id) FROM outbox_position WHERE destination = 'bus'),"
                "   (CAST('0' AS xid8), 0))) AS unpublished,"
                " (SELECT count(*) FROM outbox o WHERE NOT EXISTS"
                "   (SELECT 1 FROM ledger_entries l WHERE l.event_id = o.event_id)) AS unledgered",
                list(FINAL),
            )
        )
        if not any(state.values()):
            return
        await asyncio.sleep(0.2)
    stuck = await _stuck(conn) + await _histories(conn) if state.get("open") else ""
    raise AssertionError(f"the engine did not catch up within {timeout:g} s: {state}{stuck}")


async def _histories(conn: asyncpg.Connection) -> str:
    """The status histories (seconds after the first, status, code, reason) of up to three
    payments still open, or open at the deadline and final since."""
    rows = await conn.fetch(
        "SELECT h.transaction_id, h.status, h.response_code, h.reason,"
        " extract(epoch FROM h.at - min(h.at) OVER (PARTITION BY h.transaction_id)) AS t"
        " FROM payment_status_history h WHERE h.transaction_id IN ("
        "   SELECT transaction_id FROM payments"
        "   WHERE status <> ALL($1::text[]) OR updated_at > now() - interval '2 seconds'"
        "   ORDER BY updated_at DESC LIMIT 3)"
        " ORDER BY h.transaction_id, h.seq",
        list(FINAL),
    )
    lines: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        lines[r["transaction_id"]].append(
            f"{float(r['t']):.1f}s {r['status']} {r['response_code']} {r['reason']}"
        )
    return "".join(f"\n  {txn}: " + " -> ".join(steps) for txn, steps in lines.items())


async def _stuck(conn: asyncpg.Connection) -> str:
    """Where the open payments stopped: (status, their last event, the consumers that
    processed it) -> how many, so that a failure says which consumer missed what."""
    open_ = {
        r["transaction_id"]: r["status"]
        for r in await conn.fetch(
            "SELECT transaction_id, status FROM payments WHERE status <> ALL($1::text[])",
            list(FINAL),
        )
    }
    last: dict[str, tuple[str, Any]] = {}
    for row in await conn.fetch("SELECT event_id, envelope FROM outbox ORDER BY id"):
        envelope = Envelope.from_bytes(bytes(row["envelope"]))
        if envelope.transaction_id in open_:
            last[envelope.transaction_id] = (envelope.event_type, row["event_id"])
    consumers: dict[Any, list[str]] = defaultdict(list)
    for row in await conn.fetch(
        "SELECT event_id, consumer FROM inbox WHERE event_id = ANY($1::uuid[]) ORDER BY consumer",
        [event_id for _, event_id in last.values()],
    ):
        consumers[row["event_id"]].append(row["consumer"])
    shapes: Counter[tuple[str, str, tuple[str, ...]]] = Counter()
    for txn, status in open_.items():
        event_type, event_id = last.get(txn, ("no event", None))
        shapes[(status, event_type, tuple(consumers.get(event_id, ())))] += 1
    return "; open payments by (status, last event, consumers done with it): " + ", ".join(
        f"{shape}: {n}" for shape, n in shapes.most_common(6)
    )


async def _assert_all(
    conn: asyncpg.Connection, acknowledged: set[str] | None, dead_letters_allowed: int
) -> Checked:
    payments = {
        r["transaction_id"]: r
        for r in await conn.fetch("SELECT transaction_id, amount_paise, status FROM payments")
    }
    # 1. Each acknowledged payment once, final once; nothing nobody asked for.
    if acknowledged is not None:
        missing = acknowledged - set(payments)
        assert not missing, f"{len(missing)} acknowledged payments lost: {sorted(missing)[:5]}"
        extra = set(payments) - acknowledged
        assert not extra, f"{len(extra)} payments nobody was told of: {sorted(extra)[:5]}"
    finals = Counter(
        r["transaction_id"]
        for r in await conn.fetch(
            "SELECT transaction_id FROM payment_status_history WHERE status = ANY($1::text[])",
            list(FINAL),
        )
    )
    for txn, p in payments.items():
        assert p["status"] in FINAL, f"{txn} is {p['status']}"
        assert finals[txn] == 1, f"{txn} has {finals[txn]} final statuses"

    # 2. No double debit; each payer's balance moved by its payments less its refunds.
    journal = {
        r["txn_id"]: r
        for r in await conn.fetch(
            "SELECT txn_id, kind, payer_vpa, amount_paise, status, debited, original_txn_id"
            " FROM npci_sim.transactions"
        )
    }
    # The payer of a payment: the switch's, as the engine seals its own (SPEC §1).
    payer_of = {txn: r["payer_vpa"] for txn, r in journal.items() if r["kind"] == "PAY"}
    refunded: dict[str, int] = defaultdict(int)  # by payment
    refunds_back: dict[str, int] = defaultdict(int)  # credited back to a payer
    for r in await conn.fetch(
        "SELECT r.transaction_id, r.amount_paise, r.status, p.amount_paise AS paid"
        " FROM refunds r JOIN payments p USING (transaction_id)"
    ):
        if r["status"] != "FAILED":
            refunded[r["transaction_id"]] += r["amount_paise"]
        if r["status"] == "SUCCESS":
            refunds_back[payer_of[r["transaction_id"]]] += r["amount_paise"]
    spent: dict[str, int] = defaultdict(int)
    for txn, p in payments.items():
        entry = journal.get(txn)
        debited = entry is not None and entry["kind"] == "PAY" and entry["debited"]
        if p["status"] == "SUCCESS":
            assert debited, f"{txn} SUCCESS without a debit at the switch"
            spent[payer_of[txn]] += p["amount_paise"]
        elif p["status"] != "REVERSED":
            assert not debited, f"{txn} is {p['status']} but its payer was debited"
        # 4. Refunds never exceed their payment.
        assert refunded[txn] <= p["amount_paise"], f"{txn} refunded {refunded[txn]}"
    balances = {
        r["vpa"]: r["balance_paise"]
        for r in await conn.fetch("SELECT vpa, balance_paise FROM npci_sim.accounts")
    }
    payers = {payer_of[txn] for txn in payments if txn in payer_of}
    for payer in payers & set(balances):
        moved = opening_balance(payer) - balances[payer]
        expected = spent[payer] - refunds_back[payer]
        assert moved == expected, f"{payer} moved {moved}, expected {expected}"
    # 3. Conservation: every paisa that left an account arrived in another.
    total = sum(balance - opening_balance(vpa) for vpa, balance in balances.items())
    assert total == 0, f"the switch's balances changed by {total} paise in all"

    # 5. Each event once; outbox drained (waited for above); consumers caught up.
    events: Counter[tuple[str, str]] = Counter()
    count = 0
    for raw in await conn.fetch("SELECT envelope FROM outbox"):
        env = Envelope.from_bytes(bytes(raw["envelope"]))
        events[(env.transaction_id, env.event_type)] += 1
        count += 1
    twice = [key for key, n in events.items() if n > 1 and key[1] != "AuditAccessed"]
    assert not twice, f"events emitted twice: {twice[:5]}"
    for txn in payments:
        terminal = [t for (x, t) in events if x == txn and t in _TERMINAL_EVENTS]
        assert len(terminal) == 1, f"{txn}: terminal events {terminal}"
    # 7. Within NPCI's check-status budget: nothing refused, whatever the faults.
    refused = await conn.fetch(
        "SELECT txn_id, outcome FROM npci_sim.api_calls WHERE outcome <> 'answered' LIMIT 5"
    )
    assert not refused, f"the switch refused calls: {[tuple(r) for r in refused]}"
    dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
    assert dead <= dead_letters_allowed, f"{dead} dead letters"
    ledger_entries = await conn.fetchval("SELECT count(*) FROM ledger_entries")
    return Checked(
        payments=len(payments),
        by_status=dict(Counter(p["status"] for p in payments.values())),
        events=count,
        ledger_entries=int(ledger_entries),
    )

"""NPCI's ten settlement cycles and DC1/DC2 in ``summary.json``, on the real PostgreSQL:
payments and refunds final at chosen IST times land in the right cycles, every cycle is
reported in the table's order, a carried item is in the first cycle of the date carrying
it, and a configured table groups the same date its own way."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from api.switch_journal import SwitchSettlementJournal
from core.clock import IST, FakeClock
from core.crypto import MasterKey
from core.events import Envelope, MerchantVpaRegistered, PaymentSucceeded, RefundSucceeded
from core.pii import Vpa
from npcisim.mock import MockSwitch
from settlement.cycles import NPCI_CYCLES, CycleTable
from settlement.holidays import HolidayCalendar
from settlement.recorder import SettlementRecorder
from settlement.run import FILES, settle_business_date, write_files

pytestmark = pytest.mark.postgres

DAY = date(2026, 3, 2)
KEY = MasterKey(os.urandom(32))
PAYEE = "kirana@okicici"


def ist(day: date, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm, ss), tzinfo=IST)


def paid(txn: str, when: datetime, amount: int) -> PaymentSucceeded:
    return PaymentSucceeded(
        transaction_id=txn,
        merchant_id="mer_a",
        amount_paise=amount,
        response_code="00",
        rrn=f"{abs(hash(txn)) % 10**12:012d}",
        completed_at=when,
        payer_vpa="a1@okhdfc",
        payee_vpa=PAYEE,
        payer_bank="HDFC",
        payee_bank="ICICI",
        merchant_mcc="5411",
    )


def refunded(ref: str, txn: str, when: datetime, amount: int) -> RefundSucceeded:
    return RefundSucceeded(
        transaction_id=txn,
        merchant_id="mer_a",
        refund_id=ref,
        amount_paise=amount,
        response_code="00",
        rrn=f"{abs(hash(ref)) % 10**12:012d}",
        payer_bank="HDFC",
        payee_bank="ICICI",
        completed_at=when,
    )


async def record(db, events, journal: list[tuple[str, str, int, datetime]]) -> None:
    """Our events, and the switch's matching debits (reference, kind, amount, time)."""
    registered = MerchantVpaRegistered(
        merchant_id="mer_a", vpa=Vpa(PAYEE), registered_at=ist(DAY, 0) - timedelta(days=30)
    )
    await SettlementRecorder(db, KEY).record(
        [Envelope.wrap(e, partition_key="k") for e in (registered, *events)]
    )
    async with db.transaction() as conn:
        for reference, kind, amount, when in journal:
            await conn.execute(
                text(
                    "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa,"
                    " payer_bank, payee_bank, amount_paise, status, response_code, rrn, debited,"
                    " created_at)"
                    " VALUES (:t, :k, 'a1@okhdfc', :p, 'HDFC', 'ICICI', :a, 'SUCCESS', '00',"
                    " '000000000001', true, :at)"
                ),
                {"t": reference, "k": kind, "p": PAYEE, "a": amount, "at": when},
            )


async def close(db, day=DAY, cycles: CycleTable = NPCI_CYCLES):
    return await settle_business_date(
        db,
        SwitchSettlementJournal(MockSwitch(db)),
        day,
        calendar=HolidayCalendar.default(),
        mdr_bps={"default": 0},
        clock=FakeClock(datetime(2026, 3, 10, tzinfo=UTC)),
        cycles=cycles,
    )


# (transaction, IST time of its success, amount, expected cycle)
TIMES = [
    ("UPI00", (0, 0, 0), 100, "C2"),  # midnight: cycle 1's cut-off, so cycle 2
    ("UPI01", (4, 59, 59), 200, "C2"),
    ("UPI02", (5, 0, 0), 300, "C3"),  # exactly at a cut-off: the next cycle
    ("UPI03", (8, 30, 0), 400, "C4"),
    ("UPI04", (12, 0, 0), 500, "C6"),
    ("UPI05", (12, 59, 59), 600, "C6"),
    ("UPI06", (20, 59, 59), 700, "C10"),
    ("UPI07", (21, 0, 0), 800, "C1"),  # after the last cut-off: cycle 1, still 2 March
    ("UPI08", (23, 59, 59), 900, "C1"),
]


async def test_summary_reports_all_twelve_cycles_with_their_counts(db, tmp_path: Path):
    events: list = [paid(t, ist(DAY, *hms), a) for t, hms, a, _ in TIMES]
    journal = [(t, "PAY", a, ist(DAY, *hms)) for t, hms, a, _ in TIMES]
    events.append(refunded("RFD1", "UPI03", ist(DAY, 16, 0), 50))  # 16:00: cycle 8
    journal.append(("RFD1", "REFUND", 50, ist(DAY, 16, 0)))
    await record(db, events, journal)

    result = await close(db)
    cycles = result.summary["cycles"]
    expected = {name: (0, 0) for name in NPCI_CYCLES.names}
    for _, _, amount, cycle in TIMES:
        items, total = expected[cycle]
        expected[cycle] = (items + 1, total + amount)
    expected["C8"] = (1, 50)
    assert {n: (c["items"], c["amount_paise"]) for n, c in cycles.items()} == expected
    assert expected["C1"] == (2, 1_700) and expected["C2"] == (2, 300)
    assert (cycles["DC1"], cycles["DC2"]) == (
        {"items": 0, "amount_paise": 0, "cutoff": "16:00", "dispute": True},
        {"items": 0, "amount_paise": 0, "cutoff": "24:00", "dispute": True},
    )
    assert cycles["C1"]["cutoff"] == "00:00" and cycles["C1"]["dispute"] is False
    # Every item of the date is in exactly one cycle: the cycles add up to the summary.
    assert sum(c["items"] for c in cycles.values()) == len(TIMES) + 1
    assert result.summary["payments"] == len(TIMES) and result.summary["refunds"] == 1

    # summary.json lists the cycles in the table's order, and a rerun is byte-identical.
    out = write_files(result, tmp_path / "first")
    written = (out / "summary.json").read_bytes()
    assert list(orjson.loads(written)["cycles"]) == list(NPCI_CYCLES.names)
    assert written.index(b'"C2"') < written.index(b'"C10"') < written.index(b'"DC1"')
    again = write_files(await close(db), tmp_path / "again")
    assert all((again / n).read_bytes() == (out / n).read_bytes() for n in FILES)


async def test_an_item_carried_from_a_closed_date_is_in_cycle_1_of_the_next(db):
    await record(db, [paid("UPI10", ist(DAY, 10), 1_000)], [("UPI10", "PAY", 1_000, ist(DAY, 10))])
    await close(db)  # 2 March closes with UPI10 only
    late = paid("UPI11", ist(DAY, 14), 2_000)  # final on 2 March, arrives after its close
    await record(db, [late], [("UPI11", "PAY", 2_000, ist(DAY, 14))])
    next_day = DAY + timedelta(days=1)
    on_time = paid("UPI12", ist(next_day, 14), 3_000)
    await record(db, [on_time], [("UPI12", "PAY", 3_000, ist(next_day, 14))])

    summary = (await close(db, next_day)).summary
    assert "UPI11" in summary["late_items"]
    counts = {n: c["items"] for n, c in summary["cycles"].items() if c["items"]}
    assert counts == {"C1": 1, "C7": 1}  # UPI11 carried: cycle 1; UPI12 at 14:00: cycle 7
    assert summary["cycles"]["C1"]["amount_paise"] == 2_000


async def test_a_configured_table_groups_the_date_its_own_way(db):
    await record(
        db,
        [paid("UPI20", ist(DAY, 11, 59), 100), paid("UPI21", ist(DAY, 12), 200)],
        [("UPI20", "PAY", 100, ist(DAY, 11, 59)), ("UPI21", "PAY", 200, ist(DAY, 12))],
    )
    halves = CycleTable.from_entries(
        [
            {"name": "AM", "cutoff": "12:00"},
            {"name": "PM", "cutoff": "24:00"},
            {"name": "DC", "cutoff": "24:00", "dispute": True},
        ]
    )
    cycles = (await close(db, cycles=halves)).summary["cycles"]
    assert {n: (c["items"], c["amount_paise"]) for n, c in cycles.items()} == {
        "AM": (1, 100),
        "PM": (1, 200),
        "DC": (0, 0),
    }

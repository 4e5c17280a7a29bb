"""T+1 settlement on the real PostgreSQL with a simulated day of 10,000+ payments, refunds,
failures and deemed payments, mismatches injected into the switch's journal, and payments
into VPAs that are not registered to the merchant credited."""

from __future__ import annotations

import csv
import io
import os
import random
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from api.switch_journal import SwitchSettlementJournal
from compliance.ledger import LedgerWriter
from core.clock import IST, FakeClock
from core.crypto import MasterKey
from core.events import (
    CATALOGUE,
    Envelope,
    MerchantVpaRegistered,
    PaymentDeemed,
    PaymentFailed,
    PaymentSubmitted,
    PaymentSucceeded,
    RefundSucceeded,
)
from core.ids import new_rrn
from core.pii import Vpa
from npcisim.mock import MockSwitch
from settlement import run as settlement_run
from settlement.cycles import NPCI_CYCLES
from settlement.holidays import HolidayCalendar
from settlement.journal import ComplianceLedgerIndex
from settlement.recorder import SettlementRecorder
from settlement.run import FILES, settle_business_date, write_files

pytestmark = pytest.mark.postgres

DAY = date(2026, 3, 2)  # a Monday; settles Tuesday 3 March
BANKS = {"okhdfc": "HDFC", "okicici": "ICICI", "oksbi": "SBI", "okaxis": "AXIS", "ybl": "YES"}
MERCHANTS = {
    "mer_a": ("5411", "kirana@okicici"),
    "mer_b": ("5812", "chai@oksbi"),
    "mer_c": ("8220", "college@okhdfc"),
    "mer_d": ("7999", "games@ybl"),
}
MDR = {"5411": 30, "5812": 0, "8220": 15, "default": 0}
# A second collection VPA of each merchant (upi-engine merchant add-vpa).
ADDED = {m: f"{m}-till2@okaxis" for m in MERCHANTS}
KEY = MasterKey(os.urandom(32))


def registrations() -> list[Envelope]:
    """The merchants' VPAs, as the gateway published them when they were registered."""
    before = datetime.combine(DAY, time(), tzinfo=IST) - timedelta(days=30)
    return [
        Envelope.wrap(
            MerchantVpaRegistered(merchant_id=m, vpa=Vpa(vpa), registered_at=before),
            partition_key=f"merchant:{m}",
        )
        for m in sorted(MERCHANTS)
        for vpa in (MERCHANTS[m][1], ADDED[m])
    ]


def at(seconds: int) -> datetime:
    return datetime.combine(DAY, time(), tzinfo=IST) + timedelta(seconds=seconds)


class Day:
    """The gateway's events and the switch's journal for one simulated day."""

    def __init__(self, n: int = 10_000, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.events: list[Envelope] = registrations()
        success_at: dict[str, int] = {}  # txn → its PaymentSucceeded in events
        self.journal: list[tuple] = []
        self.succeeded: dict[str, tuple[str, int, str, str]] = {}  # txn → merchant, amount, banks
        self.failed: list[str] = []
        self.deemed_open: list[str] = []
        self.refunds: dict[str, tuple[str, int, str, str]] = {}
        for i in range(n):
            txn = f"UPI{i:032d}"
            merchant = rng.choice(sorted(MERCHANTS))
            mcc, payee = MERCHANTS[merchant]
            handle = rng.choice(sorted(BANKS))
            payer = f"payer{rng.randrange(3000)}@{handle}"
            amount = rng.randrange(100, 500_000)
            when = at(rng.randrange(86_400))
            fate = rng.random()
            payer_bank, payee_bank = BANKS[handle], BANKS[payee.split("@")[1]]
            if fate < 0.07:
                self.events.append(
                    self._wrap(
                        PaymentFailed(
                            transaction_id=txn,
                            merchant_id=merchant,
                            amount_paise=amount,
                            response_code="Z9",
                            completed_at=when,
                            reason="insufficient",
                        )
                    )
                )
                self.failed.append(txn)
                self.journal.append(
                    (
                        txn,
                        "PAY",
                        payer,
                        payee,
                        payer_bank,
                        payee_bank,
                        amount,
                        "FAILED",
                        "Z9",
                        False,
                        when,
                    )
                )
                continue
            if fate < 0.08:  # deemed; a few never resolved by the close
                self.events.append(
                    self._wrap(
                        PaymentDeemed(
                            transaction_id=txn,
                            merchant_id=merchant,
                            response_code="RB",
                            deemed_at=when,
                        )
                    )
                )
                if fate < 0.0712:
                    self.deemed_open.append(txn)
                    self.journal.append(
                        (
                            txn,
                            "PAY",
                            payer,
                            payee,
                            payer_bank,
                            payee_bank,
                            amount,
                            "SUCCESS",
                            "00",
                            True,
                            when,
                        )
                    )
                    continue
            self.events.append(
                self._wrap(
                    PaymentSucceeded(
                        transaction_id=txn,
                        merchant_id=merchant,
                        amount_paise=amount,
                        response_code="00",
                        rrn=new_rrn(),
                        completed_at=when,
                        payer_vpa=payer,
                        payee_vpa=payee,
                        payer_bank=payer_bank,
                        payee_bank=payee_bank,
                        merchant_mcc=mcc,
                    )
                )
            )
            success_at[txn] = len(self.events) - 1
            self.succeeded[txn] = (merchant, amount, payer_bank, payee_bank)
            self.journal.append(
                (
                    txn,
                    "PAY",
                    payer,
                    payee,
                    payer_bank,
                    payee_bank,
                    amount,
                    "SUCCESS",
                    "00",
                    True,
                    when,
                )
            )
            if rng.random() < 0.06:
                ref = f"RFD{i:032d}"
                part = rng.randrange(1, amount + 1)
                done = min(when + timedelta(minutes=5), at(86_399))
                self.events.append(
                    self._wrap(
                        RefundSucceeded(
                            transaction_id=txn,
                            merchant_id=merchant,
                            refund_id=ref,
                            amount_paise=part,
                            response_code="00",
                            rrn=new_rrn(),
                            payer_bank=payer_bank,
                            payee_bank=payee_bank,
                            completed_at=done,
                        )
                    )
                )
                self.refunds[ref] = (merchant, part, payer_bank, payee_bank)
                self.journal.append(
                    (
                        ref,
                        "REFUND",
                        payer,
                        payee,
                        payer_bank,
                        payee_bank,
                        part,
                        "SUCCESS",
                        "00",
                        True,
                        done,
                    )
                )

        # Three payments name another payee (data from before the gateway refused foreign
        # payees): one into a VPA nobody registered, one into another merchant's VPA — both
        # withheld — and one into its merchant's added VPA, credited as usual.
        thief, others, added = sorted(self.succeeded)[-3:]
        stranger = next(m for m in sorted(MERCHANTS) if m != self.succeeded[others][0])
        for txn, payee in (
            (thief, "thief@okaxis"),
            (others, MERCHANTS[stranger][1]),
            (added, ADDED[self.succeeded[added][0]]),
        ):
            event = CATALOGUE.decode(self.events[success_at[txn]])
            self.events[success_at[txn]] = self._wrap(
                event.model_copy(update={"payee_vpa": Vpa(payee)})
            )
        self.withheld = {thief, others}

    @staticmethod
    def _wrap(event) -> Envelope:
        return Envelope.wrap(event, partition_key="k", occurred_at=datetime.now(UTC))


async def load(db, day: Day) -> None:
    recorder = SettlementRecorder(db, KEY)
    for i in range(0, len(day.events), 1_000):
        await recorder.record(day.events[i : i + 1_000])
    async with db.transaction() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.copy_records_to_table(
            "transactions",
            schema_name="npci_sim",
            columns=[
                "txn_id",
                "kind",
                "payer_vpa",
                "payee_vpa",
                "payer_bank",
                "payee_bank",
                "amount_paise",
                "status",
                "response_code",
                "debited",
                "created_at",
                "rrn",
            ],
            records=[(*row, new_rrn()) for row in day.journal],
        )


async def inject(db, day: Day) -> dict[str, str]:
    """Break the switch's journal in known ways; returns reference → expected class."""
    ok = sorted(day.succeeded)
    expected = {}
    async with db.transaction() as conn:
        for txn in ok[:3]:
            await conn.execute(
                text("DELETE FROM npci_sim.transactions WHERE txn_id = :t"), {"t": txn}
            )
            expected[txn] = "gateway_only"
        for txn in ok[3:5]:
            await conn.execute(
                text("UPDATE npci_sim.transactions SET debited = false WHERE txn_id = :t"),
                {"t": txn},
            )
            expected[txn] = "gateway_only"
        for txn in ok[5:7]:
            await conn.execute(
                text(
                    "UPDATE npci_sim.transactions SET amount_paise = amount_paise + 1"
                    " WHERE txn_id = :t"
                ),
                {"t": txn},
            )
            expected[txn] = "amount_mismatch"
        for txn in sorted(day.failed)[:3]:
            await conn.execute(
                text("UPDATE npci_sim.transactions SET debited = true WHERE txn_id = :t"),
                {"t": txn},
            )
            expected[txn] = "late_success"  # we failed it, the switch debited: given back
        for k in range(2):
            ghost = f"UPIGHOST{k:027d}"
            await conn.execute(
                text(
                    "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa,"
                    " payer_bank, payee_bank, amount_paise, status, response_code, rrn, debited,"
                    " created_at)"
                    " VALUES (:t, 'PAY', 'x1@ybl', 'kirana@okicici', 'YES', 'ICICI', 999,"
                    " 'SUCCESS', '00', '000000000001', true, :at)"
                ),
                {"t": ghost, "at": at(3_600 * (k + 1))},
            )
            expected[ghost] = "switch_only"
    for txn in day.deemed_open:
        expected[txn] = "deemed_unresolved"
    for txn in day.withheld:
        expected[txn] = "payee_not_registered"
    return expected


def read_csv(content: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content)))


async def close(db, clock, day=DAY):
    return await settle_business_date(
        db,
        SwitchSettlementJournal(MockSwitch(db)),
        day,
        ledger=ComplianceLedgerIndex(db),
        calendar=HolidayCalendar.default(),
        mdr_bps=MDR,
        clock=clock,
    )


@pytest.fixture
async def simulated(db):
    day = Day()
    await load(db, day)
    expected = await inject(db, day)
    # The compliance ledger saw every event but two successes (lost on the way there).
    lost = {e.transaction_id for e in day.events if e.event_type == "PaymentSucceeded"}
    lost = set(sorted(lost)[100:102])
    writer = LedgerWriter(
        db, MasterKey(os.urandom(32)), FakeClock(datetime(2026, 3, 3, tzinfo=UTC))
    )
    kept = [
        e
        for e in day.events
        if not (e.event_type == "PaymentSucceeded" and e.transaction_id in lost)
    ]
    for i in range(0, len(kept), 2_000):
        await writer.append(kept[i : i + 2_000])
    day.lost_from_ledger = sorted(lost)
    return day, expected


async def test_a_simulated_day_settles_to_the_paisa(db, simulated, tmp_path: Path):
    day, expected = simulated
    assert len(day.succeeded) + len(day.failed) + len(day.deemed_open) >= 10_000
    clock = FakeClock(datetime(2026, 3, 3, 2, 0, tzinfo=UTC))
    result = await close(db, clock)
    out = write_files(result, tmp_path)
    files = {name: (out / name).read_text() for name in FILES}

    recon = read_csv(files["reconciliation.csv"])
    found = {row["transaction_id"]: row["class"] for row in recon}
    assert found == expected  # every injected mismatch, and nothing else
    assert all(row["action"] for row in recon)
    late = {t for t, c in expected.items() if c == "late_success"}
    assert {r["transaction_id"] for r in recon if r["action"].startswith("reversed to payer")} == (
        late
    )
    # Each late success goes back to its payer: published with the close, once.
    assert set(result.summary["late_successes"]) == late
    async with db.connection() as conn:
        published = (
            await conn.execute(
                text(
                    "SELECT convert_from(envelope, 'UTF8')::jsonb ->> 'transaction_id' FROM outbox"
                    " WHERE event_type = 'LateSuccessFound'"
                )
            )
        ).scalars()
        assert sorted(published) == sorted(late)

    held = {t for t, c in expected.items() if c in ("gateway_only", "amount_mismatch")}
    settled = {t: v for t, v in day.succeeded.items() if t not in held}
    # Withheld payments moved between the banks, but are not credited to the merchant.
    credited = {t: v for t, v in settled.items() if t not in day.withheld}
    assert len(day.withheld) == 2 and day.withheld <= set(settled)
    withheld_rows = [r for r in recon if r["class"] == "payee_not_registered"]
    assert all(r["action"].startswith("withheld from the merchant payout") for r in withheld_rows)
    assert {(r["gateway_status"], r["switch_status"]) for r in withheld_rows} == {
        ("SUCCESS", "DEBITED")
    }
    payouts = read_csv(files["merchant_payouts.csv"])
    for row in payouts:
        m = row["merchant_id"]
        gross = sum(a for (mm, a, _, _) in credited.values() if mm == m)
        refunds = sum(a for (mm, a, _, _) in day.refunds.values() if mm == m)
        fee = (2 * gross * MDR.get(MERCHANTS[m][0], 0) + 10_000) // 20_000
        gst = (2 * fee * 18 + 100) // 200
        assert int(row["gross_paise"]) == gross, m
        assert int(row["refunds_paise"]) == refunds, m
        assert int(row["fee_paise"]) == fee and int(row["gst_on_fee_paise"]) == gst, m
        assert int(row["net_payout_paise"]) == gross - refunds - fee - gst, m
        assert int(row["count"]) == sum(1 for (mm, *_) in credited.values() if mm == m)
        assert row["settlement_date"] == "2026-03-03"
    assert {r["merchant_id"] for r in payouts} == set(MERCHANTS)

    banks = read_csv(files["interbank_net.csv"])
    assert sum(int(r["net_paise"]) for r in banks) == 0
    for r in banks:
        debits = sum(a for (_, a, p, _) in settled.values() if p == r["bank"])
        debits += sum(a for (_, a, _, q) in day.refunds.values() if q == r["bank"])
        credits = sum(a for (_, a, _, q) in settled.values() if q == r["bank"])
        credits += sum(a for (_, a, p, _) in day.refunds.values() if p == r["bank"])
        assert (int(r["debits_paise"]), int(r["credits_paise"])) == (debits, credits), r["bank"]

    summary = orjson.loads(files["summary.json"])
    assert summary["payments"] == len(credited)
    assert summary["gross_paise"] == sum(a for (_, a, _, _) in credited.values())
    assert summary["withheld_paise"] == sum(day.succeeded[t][1] for t in day.withheld)
    assert summary["interbank_nets_sum_paise"] == 0
    assert summary["reconciliation"]["matched"] == len(credited) + len(day.refunds)
    assert summary["reconciliation"]["payee_not_registered"] == 2
    assert sum(c["items"] for c in summary["cycles"].values()) == len(credited) + len(day.refunds)
    assert list(summary["cycles"]) == list(NPCI_CYCLES.names)  # all twelve, in NPCI's order
    assert all(summary["cycles"][f"C{n}"]["items"] > 0 for n in range(1, 11))
    assert summary["cycles"]["DC1"]["items"] == summary["cycles"]["DC2"]["items"] == 0
    assert summary["ledger"] == {"checked": True, "not_in_ledger": day.lost_from_ledger}

    # Running it again gives identical files.
    again = await close(db, clock)
    assert not again.closed_now
    out2 = write_files(again, tmp_path / "again")
    assert all((out2 / n).read_bytes() == (out / n).read_bytes() for n in FILES)
    async with db.connection() as conn:
        closed_events = (
            await conn.execute(
                text("SELECT count(*) FROM outbox WHERE event_type = 'SettlementClosed'")
            )
        ).scalar_one()
    assert closed_events == 1


async def test_a_crash_in_the_middle_then_a_rerun_gives_the_right_files(
    db, simulated, tmp_path: Path, monkeypatch
):
    clock = FakeClock(datetime(2026, 3, 3, 2, 0, tzinfo=UTC))

    class FailingJournal:
        async def rows(self, business_date, references):
            raise ConnectionError("switch journal unreachable mid-run")

    with pytest.raises(ConnectionError):
        await settle_business_date(
            db,
            FailingJournal(),
            DAY,
            calendar=HolidayCalendar.default(),
            mdr_bps=MDR,
            clock=clock,
        )
    async with db.connection() as conn:  # nothing was closed
        assert (await conn.execute(text("SELECT count(*) FROM settlement_runs"))).scalar_one() == 0

    result = await close(db, clock)
    real_replace = os.replace
    written = []

    def crash_after_first(src, dst):
        if written:
            raise OSError("power cut while writing the files")
        written.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(settlement_run.os, "replace", crash_after_first)
    with pytest.raises(OSError):
        write_files(result, tmp_path / "crashed")
    monkeypatch.setattr(settlement_run.os, "replace", real_replace)
    rerun = write_files(await close(db, clock), tmp_path / "crashed")
    clean = write_files(result, tmp_path / "clean")
    for name in FILES:
        assert (rerun / name).read_bytes() == (clean / name).read_bytes(), name


async def test_a_final_status_after_the_date_closed_goes_to_the_next_cycle(db, tmp_path: Path):
    clock = FakeClock(datetime(2026, 3, 3, 2, 0, tzinfo=UTC))
    recorder = SettlementRecorder(db, KEY)
    await recorder.record(registrations())
    first = PaymentSucceeded(
        transaction_id="UPI1",
        merchant_id="mer_a",
        amount_paise=1_000,
        response_code="00",
        rrn="111111111111",
        completed_at=at(100),
        payer_vpa="a1@okhdfc",
        payee_vpa="kirana@okicici",
        payer_bank="HDFC",
        payee_bank="ICICI",
        merchant_mcc="5411",
    )
    submitted = PaymentSubmitted(
        transaction_id="UPI2",
        merchant_id="mer_a",
        payer_vpa="a1@okhdfc",
        payee_vpa="kirana@okicici",
        amount_paise=1_000,
        submitted_at=at(79_990),
    )
    await recorder.record([Envelope.wrap(e, partition_key="k") for e in (first, submitted)])
    async with db.transaction() as conn:  # the switch debited both
        for txn, when in (("UPI1", at(100)), ("UPI2", at(80_000))):
            await conn.execute(
                text(
                    "INSERT INTO npci_sim.transactions (txn_id, kind, payer_vpa, payee_vpa,"
                    " payer_bank, payee_bank, amount_paise, status, response_code, rrn, debited,"
                    " created_at)"
                    " VALUES (:t, 'PAY', 'a1@okhdfc', 'kirana@okicici', 'HDFC', 'ICICI', 1000,"
                    " 'SUCCESS', '00', '000000000001', true, :at)"
                ),
                {"t": txn, "at": when},
            )
    closed = await close(db, clock)
    before = write_files(closed, tmp_path / "before")
    late = PaymentSucceeded(
        **{
            **first.model_dump(),
            "transaction_id": "UPI2",
            "rrn": "2" * 12,
            "completed_at": at(80_000),
        }
    )
    await recorder.record([Envelope.wrap(late, partition_key="k")])
    after = write_files(await close(db, clock), tmp_path / "after")
    assert (after / "summary.json").read_bytes() == (before / "summary.json").read_bytes()
    next_day = await close(db, clock, DAY + timedelta(days=1))
    summary = next_day.summary
    assert summary["payments"] == 1 and summary["gross_paise"] == 1_000
    assert "already closed" in summary["late_items"]["UPI2"]
    assert summary["settlement_date"] == "2026-03-05"  # 4 March is Holi
    # At D's close UPI2 was in flight: carried, not taken for a switch-only debit.
    assert closed.summary["reconciliation"]["deemed_unresolved"] == 1
    assert closed.summary["reconciliation"]["switch_only"] == 0

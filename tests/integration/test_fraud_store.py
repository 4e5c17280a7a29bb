"""The fraud history in the real PostgreSQL: the same numbers as the simulator's in-memory
history (training and scoring see the same features), restart safety, redelivery."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core.clock import FakeClock
from core.config import Settings
from core.crypto import MasterKey
from core.events import CATALOGUE, DeviceInfo, Envelope, FraudAssessed, PaymentInitiated
from core.pii import Vpa, unkeyed_partition_key
from fraud.assessor import FraudAssessor
from fraud.features import Txn, milli_log
from fraud.history import PAYEE_WINDOW, HistoryTracker
from fraud.simulator import simulate
from fraud.store import HistoryStore, split_rounds

pytestmark = pytest.mark.postgres

KEY = MasterKey(os.urandom(32))
MS = timedelta(milliseconds=1)


# Issue 18's fields for bursts, collect requests and shops' price points: the traffic
# below must give each a value somewhere, or the comparison would prove little.
EXERCISED = (
    "seconds_since_prev",
    "payer_to_payee_10m",
    "young_payee_payers",
    "young_payee_large_payers",
    "payer_milli_log_sum",
    "payee_structured_payers_10m",
    "payee_structured_payers_1h",
)


async def test_database_history_equals_the_simulators_history(db):
    """Field by field, payment by payment, over simulated traffic with every typology."""
    traffic = simulate(11, payers=120, days=1.0, scale=0.08)
    assert len(traffic) > 300
    store, memory = HistoryStore(KEY), HistoryTracker()
    seen: set[str] = set()
    for n, item in enumerate(traffic):
        async with db.transaction() as conn:
            from_db = await store.history(conn, item.txn)
            await store.observe(conn, f"T{n}", item.txn)
        from_memory = memory.history(item.txn)
        memory.observe(item.txn)
        assert from_db == from_memory, (n, item)
        seen |= {name for name in EXERCISED if getattr(from_memory, name)}
    assert seen == set(EXERCISED)  # the traffic gives each of these a value, not only 0


async def read_and_record_in_rounds(conn, store: HistoryStore, ids: list[str], txns: list[Txn]):
    """What the fraud consumer does with a batch: the payee windows of the whole batch,
    then round by round the histories and the recording. The histories, by position."""
    keys = [store.pseudonyms(t) for t in txns]
    payee = await store.payee_windows(conn, txns, keys)
    found: dict[int, object] = {}
    rounds = split_rounds(txns)
    for positions in rounds:
        part = [txns[i] for i in positions]
        read = await store.histories(
            conn, part, [payee[i] for i in positions], [keys[i] for i in positions]
        )
        found.update(zip(positions, read, strict=True))
        recorded = await store.observe_many(
            conn, [ids[i] for i in positions], part, [keys[i] for i in positions]
        )
        assert recorded == {ids[i] for i in positions}
    return [found[i] for i in range(len(txns))], len(rounds)


async def test_database_history_read_by_batches_equals_the_simulators_history(db):
    """The same, read and recorded as the consumer does, 60 payments at a time: each
    payment's history is the one it has when the payments are handled one at a time."""
    traffic = [item.txn for item in simulate(11, payers=120, days=1.0, scale=0.08)]
    store, memory = HistoryStore(KEY), HistoryTracker()
    most_rounds = 0
    for start in range(0, len(traffic), 60):
        batch = traffic[start : start + 60]
        ids = [f"T{start + i}" for i in range(len(batch))]
        async with db.transaction() as conn:
            from_db, rounds = await read_and_record_in_rounds(conn, store, ids, batch)
        most_rounds = max(most_rounds, rounds)
        for n, txn in enumerate(batch):
            assert from_db[n] == memory.history(txn), (start + n, txn)
            memory.observe(txn)
    assert most_rounds > 3  # payers and devices came back within a batch


def initiated(payer: str, amount: int, at: datetime, device: str = "phone-1", **where: float):
    event = PaymentInitiated(
        transaction_id=f"UPI{os.urandom(8).hex()}",
        merchant_id="mer_1",
        merchant_order_id="o",
        payer_vpa=Vpa(payer),
        payee_vpa=Vpa("shop@okicici"),
        amount_paise=amount,
        device=DeviceInfo(id=device, **where),
        initiated_at=at,
    )
    return Envelope.wrap(event, partition_key=unkeyed_partition_key(payer), occurred_at=at)


async def decisions(db) -> dict[str, FraudAssessed]:
    async with db.connection() as conn:
        rows = (
            await conn.execute(
                text("SELECT envelope FROM outbox WHERE event_type = 'FraudAssessed' ORDER BY id")
            )
        ).scalars()
        found = [CATALOGUE.decode(Envelope.from_bytes(bytes(r))) for r in rows]
    return {e.transaction_id: e for e in found if isinstance(e, FraudAssessed)}


def assessor(db, clock) -> FraudAssessor:
    """A new one each time: a new process with nothing in memory."""
    return FraudAssessor.from_settings(Settings(), db, KEY, clock)


async def test_velocity_state_survives_a_restart_and_redelivery_changes_nothing(db):
    clock = FakeClock(datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    burst = [
        initiated("asha@oksbi", 40_000 + i, clock.now() + timedelta(seconds=5 * i))
        for i in range(8)
    ]
    first = assessor(db, clock)
    for envelope in burst[:3]:
        await first.handle(envelope)
    first.close()  # the process stops; a new one takes over
    second = assessor(db, clock)
    for envelope in burst[3:]:
        await second.handle(envelope)
    await second.handle(burst[5])  # a redelivery
    second.close()

    found = await decisions(db)
    assert len(found) == 8  # one decision per payment, none for the redelivery
    txns = [CATALOGUE.decode(e).transaction_id for e in burst]  # type: ignore[attr-defined]
    early = [found[t] for t in txns[:3]]
    late = [found[t] for t in txns[3:]]
    assert all(d.decision.value == "ALLOW" for d in early)
    # The fourth payment in a minute was counted against the three the first process saw.
    assert all("VELOCITY_PAYER_1M" in d.reasons for d in late)
    assert all(d.decision.value in ("STEP_UP", "BLOCK") for d in late)
    async with db.connection() as conn:
        observed = (
            await conn.execute(text("SELECT count(*) FROM fraud_observations"))
        ).scalar_one()
        clear = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM fraud_observations"
                    # Bytes, not text: a keyed pseudonym may hold a 0x00 byte, which
                    # no text encoding accepts.
                    " WHERE position(convert_to('asha', 'UTF8') IN payer_key) > 0"
                )
            )
        ).scalar_one()
    assert observed == 8 and clear == 0  # keyed pseudonyms, never the VPA


async def test_impossible_travel_and_takeover_through_the_assessor(db):
    clock = FakeClock(datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    mumbai = {"latitude": 19.07, "longitude": 72.87}
    delhi = {"latitude": 28.70, "longitude": 77.10}
    a = assessor(db, clock)
    home = [
        initiated("meera@ybl", 30_000 + i, clock.now() + timedelta(hours=i), **mumbai)
        for i in range(4)
    ]
    jump = initiated("meera@ybl", 45_000, clock.now() + timedelta(hours=3, minutes=10), **delhi)
    takeover = initiated(
        "meera@ybl", 4_500_000, clock.now() + timedelta(hours=5), device="attacker", **mumbai
    )
    for envelope in [*home, jump, takeover]:
        await a.handle(envelope)
    a.close()
    found = await decisions(db)
    by_txn = {e.transaction_id: e for e in found.values()}
    t = [CATALOGUE.decode(e).transaction_id for e in [*home, jump, takeover]]  # type: ignore[attr-defined]
    assert all(by_txn[x].decision.value == "ALLOW" for x in t[:4])
    assert "IMPOSSIBLE_TRAVEL" in by_txn[t[4]].reasons
    assert by_txn[t[4]].decision.value in ("STEP_UP", "BLOCK")
    assert "DEVICE_CHANGE_BEFORE_HIGH_VALUE" in by_txn[t[5]].reasons
    assert by_txn[t[5]].decision.value in ("STEP_UP", "BLOCK")
    assert all(d.model_version.startswith("hgb-") for d in found.values())
    # The ledgered event says what each scorer contributed: who saw the travel, who the
    # new device, and the scores the combined score was made of.
    travel = by_txn[t[4]].contributions
    assert set(travel) == {"velocity", "location", "device", "model"}
    assert "IMPOSSIBLE_TRAVEL" in travel["location"].reasons
    assert "DEVICE_CHANGE_BEFORE_HIGH_VALUE" in by_txn[t[5]].contributions["device"].reasons
    assert {k: c.score for k, c in travel.items()} == by_txn[t[4]].scores


async def test_the_pruner_forgets_payments_past_retention_and_nothing_newer(db):
    from fraud.features import Txn
    from fraud.store import HistoryPruner

    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    store = HistoryStore(KEY)
    ages_days = [400, 200, 95, 91, 89, 30, 1, 0.01]
    async with db.transaction() as conn:
        for n, age in enumerate(ages_days):
            at = now - timedelta(days=age)
            txn = Txn("priya@okhdfc", "shop@okicici", 1_000 + n, at, "phone-1", (19.07, 72.87))
            assert await store.observe(conn, f"T{n}", txn)
    probe = Txn("priya@okhdfc", "shop@okicici", 500, now, "phone-1", (19.07, 72.87))
    async with db.transaction() as conn:
        before = await store.history(conn, probe)
    pruner = HistoryPruner(db, store, FakeClock(now), timedelta(days=90))
    assert await pruner.prune_once() == 4  # 400, 200, 95 and 91 days old
    assert await pruner.prune_once() == 0
    async with db.connection() as conn:
        kept = (
            await conn.execute(text("SELECT transaction_id FROM fraud_observations ORDER BY id"))
        ).scalars()
        assert list(kept) == ["T4", "T5", "T6", "T7"]
        after = await store.history(conn, probe)
    # What the scorers read of the last day, and the payer's count ever, are unchanged.
    assert (after.payer_count_24h, after.payer_amount_24h) == (
        before.payer_count_24h,
        before.payer_amount_24h,
    )
    assert after.payer_payments_ever == before.payer_payments_ever == len(ages_days)
    assert after.device_known_for_payer and after.last_location == before.last_location


async def test_pruning_forgets_old_payers_and_devices_and_the_windows_still_answer(db):
    """Past the retention go the payments, the payers with no payment left (their count
    and devices: back, they are new again), while what a payment reads of the last day
    (payer, device, payee windows, the payee's age within the retention) is the same as
    the in-memory history of the payments kept."""
    from fraud.store import HistoryPruner

    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    store = HistoryStore(KEY)
    old = [
        Txn(f"gone{n}@okhdfc", "collector@ybl", 9_999_00, now - timedelta(days=100 + n), f"ph{n}")
        for n in range(3)
    ]
    recent = [
        Txn(f"mule{n}@ybl", "collector@ybl", 9_990_00, now - timedelta(minutes=9 - n), f"m{n % 2}")
        for n in range(6)
    ]
    kept = [*recent, Txn("gone0@okhdfc", "shop@okicici", 500, now - timedelta(days=3), "ph0")]
    async with db.transaction() as conn:
        await store.observe_many(conn, [f"O{n}" for n in range(3)], old)
        for n, txn in enumerate(kept):
            await store.observe(conn, f"K{n}", txn)
    pruner = HistoryPruner(db, store, FakeClock(now), timedelta(days=90))
    # Three payments, the payers gone1 and gone2 (gone0 paid three days ago) and their
    # devices.
    assert await pruner.prune_once() == 3 + 2 + 2
    assert await pruner.prune_once() == 0
    async with db.connection() as conn:
        left = {
            table: (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in ("fraud_observations", "fraud_payers", "fraud_payer_devices")
        }
        # Six mules and gone0, each with one device.
        assert left == {"fraud_observations": 7, "fraud_payers": 7, "fraud_payer_devices": 7}
        memory = HistoryTracker()
        for txn in sorted(kept, key=lambda t: t.at):
            memory.observe(txn)
        for probe in (
            Txn("mule9@ybl", "collector@ybl", 9_999_00, now, "m1"),
            Txn("gone0@okhdfc", "collector@ybl", 9_999_00, now, "ph0"),
            Txn("gone1@okhdfc", "collector@ybl", 9_999_00, now, "m0"),
        ):
            from_db = await store.history(conn, probe)
            expected = memory.history(probe)
            if probe.payer == "gone0@okhdfc":  # its count and usual stay: 2, one pruned
                expected = dataclasses.replace(
                    expected,
                    payer_payments_ever=2,
                    payer_milli_log_sum=expected.payer_milli_log_sum + milli_log(9_999_00),
                )
            assert from_db == expected, probe
    gone1 = await _history_of(db, store, "gone1@okhdfc")
    assert gone1.payer_payments_ever == 0 and gone1.payer_devices_ever == 0
    # The collector's age is that of its oldest payment kept: nine minutes, not 100 days.
    assert 539 <= from_db.payee_first_seen_s <= 541
    assert (from_db.payee_payers_10m, from_db.payee_new_payers_10m) == (6, 6)
    assert from_db.device_payers_10m == 3  # mule0, mule2, mule4 on m0


async def _history_of(db, store: HistoryStore, payer: str):
    async with db.connection() as conn:
        return await store.history(
            conn, Txn(payer, "x@ybl", 100, datetime(2026, 6, 1, 12, tzinfo=UTC))
        )


async def test_a_payees_hour_window_is_its_latest_payments_capped_in_both_histories(db):
    """A merchant paid more than PAYEE_WINDOW times in the hour: the check of each new
    payment reads only the latest PAYEE_WINDOW of them, in the database as in memory."""
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    many = PAYEE_WINDOW + 200
    store, memory = HistoryStore(KEY), HistoryTracker()
    async with db.transaction() as conn:
        for n in range(many):
            txn = Txn(f"payer{n % (many - 50)}@ybl", "bigshop@okicici", 500, start + n * MS)
            await store.observe(conn, f"T{n}", txn)
            memory.observe(txn)
        nxt = Txn("new@ybl", "bigshop@okicici", 500, start + many * MS)
        from_db = await store.history(conn, nxt)
    assert from_db == memory.history(nxt)
    assert from_db.payee_count_1h == PAYEE_WINDOW
    # 1,150 payers paid in the hour; the latest 1,000 payments came from 1,000 of them.
    assert from_db.payee_payers_1h == PAYEE_WINDOW


async def test_a_batchs_payee_windows_count_its_own_earlier_payments_within_the_cap(db):
    """A busy merchant's window, read for a whole batch at once: each payment's window is
    its latest PAYEE_WINDOW payments, the batch's earlier ones included, as in memory."""
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    store, memory = HistoryStore(KEY), HistoryTracker()
    before = [
        Txn(f"regular{n % 900}@ybl", "bigshop@okicici", 500, start + n * MS)
        for n in range(PAYEE_WINDOW - 40)
    ]
    async with db.transaction() as conn:
        await store.observe_many(conn, [f"T{n}" for n in range(len(before))], before)
    for txn in before:
        memory.observe(txn)
    # 120 more, half from new payers, some paying twice (two rounds), all to the shop.
    batch = [
        Txn(f"new{n // 2 if n % 3 else n}@ybl", "bigshop@okicici", 700, start + (2_000 + n) * MS)
        for n in range(120)
    ]
    async with db.transaction() as conn:
        from_db, rounds = await read_and_record_in_rounds(
            conn, store, [f"B{n}" for n in range(len(batch))], batch
        )
    expected = []
    for txn in batch:
        expected.append(memory.history(txn))
        memory.observe(txn)
    assert from_db == expected
    assert rounds > 1
    assert [h.payee_count_1h for h in from_db[38:43]] == [998, 999, 1000, 1000, 1000]

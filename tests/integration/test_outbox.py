"""Outbox and inbox on the real PostgreSQL."""

import asyncio
import random
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from core.events import Envelope, PaymentInitiated
from core.inbox import claim
from core.outbox import OutboxRelay, append_to_outbox

pytestmark = pytest.mark.postgres


def envelope(n: int) -> Envelope:
    event = PaymentInitiated(
        transaction_id=f"UPI{n}",
        merchant_id="m",
        merchant_order_id=str(n),
        payer_vpa="alice@ybl",
        payee_vpa="bob@ybl",
        amount_paise=n + 1,
        initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return Envelope.wrap(event, partition_key=f"k{n % 3}")


async def wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def test_rolled_back_transaction_leaves_no_event(db):
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await append_to_outbox(conn, [envelope(1)])
            raise RuntimeError("business rule failed after the event was staged")
    async with db.connection() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one() == 0


@pytest.mark.parametrize("in_flight", [1, 4])
async def test_relays_publish_everything_once_in_commit_order_under_concurrent_writers(
    db, in_flight
):
    """With ``in_flight`` > 1 the publishes overlap, as on the in-process bus: a batch is
    taken in order at once and settles later, in any order."""
    published: list[Envelope] = []

    async def publish(batch):
        if in_flight > 1:
            published.extend(batch)
            await asyncio.sleep(random.uniform(0, 0.01))
        else:
            await asyncio.sleep(random.uniform(0, 0.01))
            published.extend(batch)

    relays = [
        OutboxRelay(db, publish, batch_size=7, poll_interval=0.005, max_in_flight=in_flight)
        for _ in range(2)
    ]
    tasks = [asyncio.create_task(r.run()) for r in relays]

    async def writer(w: int) -> list[str]:
        ids = []
        for i in range(10):
            batch = [envelope(w * 100 + i), envelope(w * 100 + i + 50)]
            async with db.transaction() as conn:
                await asyncio.sleep(random.uniform(0, 0.005))
                await append_to_outbox(conn, batch)
                # Hold the transaction open after staging: a relay must not pass these rows.
                await asyncio.sleep(random.uniform(0, 0.01))
            ids += [str(e.event_id) for e in batch]
        return ids

    written = [i for ids in await asyncio.gather(*(writer(w) for w in range(8))) for i in ids]
    await wait_until(lambda: len(published) >= len(written))
    await asyncio.sleep(0.1)
    assert sum(r.is_leader for r in relays) == 1
    seen = [str(e.event_id) for e in published]
    assert sorted(seen) == sorted(written) and len(seen) == len(set(seen))
    async with db.connection() as conn:
        order = (
            await conn.execute(text("SELECT event_id::text FROM outbox ORDER BY txid, id"))
        ).scalars()
        assert seen == list(order)

    # The active relay goes away: the standby takes over and continues from its position.
    leader = next(r for r in relays if r.is_leader)
    standby = next(r for r in relays if not r.is_leader)
    leader.stop()
    await tasks[relays.index(leader)]
    async with db.transaction() as conn:
        await append_to_outbox(conn, [envelope(999)])
    standby.wake()
    await wait_until(lambda: len(published) == len(written) + 1)
    assert published[-1].transaction_id == "UPI999"
    standby.stop()
    await asyncio.gather(*tasks)


async def test_inbox_claims_once(db):
    e = envelope(1)
    async with db.transaction() as conn:
        assert await claim(conn, "c", e.event_id)
        assert not await claim(conn, "c", e.event_id)
        assert await claim(conn, "other", e.event_id)


async def test_published_rows_past_retention_are_pruned_and_the_position_kept(db):
    published: list[Envelope] = []

    async def publish(batch):
        published.extend(batch)

    relay = OutboxRelay(
        db, publish, batch_size=2, poll_interval=0.005, retention_s=0, prune_every=1
    )
    task = asyncio.create_task(relay.run())
    async with db.transaction() as conn:
        await append_to_outbox(conn, [envelope(i) for i in range(5)])
    await wait_until(lambda: len(published) == 5)
    async with db.transaction() as conn:
        await append_to_outbox(conn, [envelope(9)])
    await wait_until(lambda: len(published) == 6)
    relay.stop()
    await task
    assert [e.transaction_id for e in published][-1] == "UPI9"
    assert await relay.backlog() == 0
    async with db.connection() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one() == 0

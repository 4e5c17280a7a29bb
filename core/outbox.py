"""Transactional outbox: events are rows written in the same transaction as the business rows.

Commit order. A relay reads ``outbox`` by ``id`` and remembers the last id it published. That
is only safe if ids become visible in increasing order: with plain concurrent inserts, a
transaction that took id 7 may commit after one that took id 8, and a relay that already
moved past 8 would skip 7 for ever. Like the eventsourcing library's PostgreSQL recorder
(``_lock_table``), we serialise the *insertion* of outbox rows: each writer takes one
transaction-scoped advisory lock just before inserting its rows, and holds it until it
commits. Ids are drawn after the lock is held, so they are handed out in commit order,
and a reader can never see id N+1 before id N is committed or rolled back. The lock is
taken at the very end of the unit of work, so only the insert and the commit are serialised.

Several relays. Only one relay publishes at a time: a session-level advisory lock elects
the active relay and the others stand by, taking over if it dies (its connection closes
and PostgreSQL releases the lock). That keeps the published order the commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from core.events import Envelope
from core.storage import Database, sql_text

__all__ = ["OUTBOX_WRITE_LOCK", "OutboxRelay", "append_to_outbox"]

_log = logging.getLogger(__name__)
OUTBOX_WRITE_LOCK = 0x5550_4F42  # "UPOB"
_RELAY_LEADER_LOCK = 0x5550_524C  # "UPRL"

# One statement: the lock is taken (``lk`` is joined to every row) before any row's id is
# drawn from the sequence, which happens as each joined row is formed for the insert.
_INSERT = sql_text(
    "WITH lk AS (SELECT pg_advisory_xact_lock(:lock))"
    " INSERT INTO outbox (event_id, topic, partition_key, event_type, envelope)"
    " SELECT u.* FROM lk, unnest(CAST(:ids AS uuid[]), CAST(:topics AS text[]),"
    " CAST(:keys AS text[]), CAST(:types AS text[]), CAST(:envs AS bytea[])) AS u"
)


async def append_to_outbox(conn: AsyncConnection, envelopes: Sequence[Envelope]) -> None:
    """Add events to the current transaction's outbox. Call it last in the unit of work."""
    if not envelopes:
        return
    await conn.execute(
        _INSERT,
        {
            "lock": OUTBOX_WRITE_LOCK,
            "ids": [str(e.event_id) for e in envelopes],
            "topics": [e.topic for e in envelopes],
            "keys": [e.partition_key for e in envelopes],
            "types": [e.event_type for e in envelopes],
            "envs": [e.to_bytes() for e in envelopes],
        },
    )


Publish = Callable[[Sequence[Envelope]], Awaitable[None]]
_READ_AFTER = sql_text("SELECT id, envelope FROM outbox WHERE id > :last ORDER BY id LIMIT :n")
_STORE_POSITION = sql_text(
    "INSERT INTO outbox_position (destination, last_id) VALUES (:d, :id)"
    " ON CONFLICT (destination) DO UPDATE SET last_id = EXCLUDED.last_id, updated_at = now()"
)


class OutboxRelay:
    """Publishes outbox rows in id (= commit) order, in batches, at least once."""

    def __init__(
        self,
        db: Database,
        publish: Publish,
        *,
        destination: str = "bus",
        batch_size: int = 500,
        poll_interval: float = 0.05,
        retention_s: float = 24 * 3600,
        prune_every: int = 10_000,
        max_in_flight: int = 1,
    ) -> None:
        self._db = db
        self._publish = publish
        self._destination = destination
        self._batch_size = batch_size
        self._poll = poll_interval
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.is_leader = False
        self.published = 0
        self._retention_s = retention_s
        self._pruned_at = 0
        self._prune_every = prune_every
        # More than one only for a bus that settles batches side by side and in order per
        # subscriber (the in-process bus); a broker's publish keeps one batch at a time, so
        # that its sends stay in commit order.
        self._max_in_flight = max_in_flight

    def wake(self) -> None:
        """Hint that new rows were committed (saves a poll interval in one process)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with self._db.connection() as leader_conn:
                    if await self._try_lead(leader_conn):
                        self.is_leader = True
                        _log.info("outbox relay is active")
                        try:
                            await self._publish_loop(leader_conn)
                        finally:
                            self.is_leader = False
                            # The connection goes back to the pool: give the lock back.
                            with contextlib.suppress(SQLAlchemyError, OSError):
                                await leader_conn.rollback()
                                await leader_conn.execute(
                                    sql_text("SELECT pg_advisory_unlock(:k)"),
                                    {"k": _RELAY_LEADER_LOCK},
                                )
                                await leader_conn.commit()
                    else:
                        await self._sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database or the bus failed: nothing past the last stored position was
                # acknowledged, so starting over from it is safe (consumers drop repeats).
                _log.warning("outbox relay: %s, retrying", exc, exc_info=True)
                await self._sleep(1.0)

    async def _try_lead(self, conn: AsyncConnection) -> bool:
        got = (
            await conn.execute(
                sql_text("SELECT pg_try_advisory_lock(:k)"), {"k": _RELAY_LEADER_LOCK}
            )
        ).scalar_one()
        await conn.commit()
        return bool(got)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    async def _publish_loop(self, leader_conn: AsyncConnection) -> None:
        """Read ahead and publish up to ``max_in_flight`` batches at once (a pipelined bus
        settles them side by side); store the position of the longest settled prefix."""
        settled_id = read_id = await self._position(leader_conn)
        in_flight: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        try:
            while not self._stopping.is_set():
                settled = 0
                while in_flight and in_flight[0][2].done():
                    settled_id, count, task = in_flight.popleft()
                    task.result()  # a failed publish raises here: start over from the position
                    settled += count
                if settled:
                    await self._store(leader_conn, settled_id, settled)
                if len(in_flight) >= self._max_in_flight:
                    await asyncio.wait({in_flight[0][2]})
                    continue
                rows = (
                    await leader_conn.execute(_READ_AFTER, {"last": read_id, "n": self._batch_size})
                ).all()
                await leader_conn.commit()
                if not rows:
                    if in_flight:
                        await asyncio.wait({in_flight[0][2]}, timeout=self._poll)
                    else:
                        await self._sleep(self._poll)
                    continue
                batch = [Envelope.from_bytes(bytes(row.envelope)) for row in rows]
                read_id = rows[-1].id
                task = asyncio.ensure_future(self._publish(batch))
                in_flight.append((read_id, len(batch), task))
            # Stopping: let what was handed over settle, and remember how far it got.
            settled = 0
            while in_flight:
                settled_id, count, task = in_flight.popleft()
                await task
                settled += count
            if settled:
                await self._store(leader_conn, settled_id, settled)
        finally:
            for _, _, task in in_flight:
                task.cancel()

    async def _store(self, conn: AsyncConnection, last_id: int, count: int) -> None:
        await conn.execute(_STORE_POSITION, {"d": self._destination, "id": last_id})
        await conn.commit()
        self.published += count
        if self.published - self._pruned_at >= self._prune_every:
            await self._prune(conn, last_id)

    async def _prune(self, conn: AsyncConnection, last_id: int) -> None:
        """Forget rows published long ago; the compliance ledger is the permanent record."""
        await conn.execute(
            sql_text(
                "DELETE FROM outbox WHERE id <= :last"
                " AND created_at < now() - make_interval(secs => :keep)"
            ),
            {"last": last_id, "keep": self._retention_s},
        )
        await conn.commit()
        self._pruned_at = self.published

    async def _position(self, conn: AsyncConnection) -> int:
        row = (
            await conn.execute(
                sql_text("SELECT last_id FROM outbox_position WHERE destination = :d"),
                {"d": self._destination},
            )
        ).scalar_one_or_none()
        await conn.commit()
        return int(row) if row is not None else 0

    async def backlog(self) -> int:
        """Rows committed but not yet published (for /readyz, drains and tests)."""
        async with self._db.connection() as conn:
            return int(
                (
                    await conn.execute(
                        sql_text(
                            "SELECT count(*) FROM outbox WHERE id > COALESCE("
                            "(SELECT last_id FROM outbox_position WHERE destination = :d), 0)"
                        ),
                        {"d": self._destination},
                    )
                ).scalar_one()
            )

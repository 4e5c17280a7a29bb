"""Transactional outbox: events are rows written in the same transaction as the business rows.

Reading in a safe order. A relay reads ``outbox`` forward from the last row it published
and must never skip a row that commits late: with plain ids from a sequence, a transaction
that took id 7 may commit after one that took id 8, and a relay that already moved past 8
would skip 7 for ever. Writers used to take one advisory lock around their insert and
commit, so that ids were handed out in commit order (the eventsourcing library's
``_lock_table``); that serialised every event-writing commit of the engine, and each held
the lock for as long as its process took to send the COMMIT.

Now writers never wait for each other, and the relay orders rows by *transaction
visibility*, as PgQ (and pgque) do: each row records the id of the transaction that wrote
it (``txid``, ``pg_current_xact_id()``), and the relay reads only rows whose transaction is
older than the ``xmin`` of a snapshot taken just before: every transaction below ``xmin``
has committed or rolled back, so every row it wrote is visible now, and none can appear
later. Rows are read in ``(txid, id)`` order and the position is the last ``(txid, id)``
published; a row below the position was visible when the relay passed it. A transaction's
rows appear together, and one caused by an event (a consumer's) always has a greater
``txid`` than the transaction that wrote that event, so causal and per-payer order hold.
The price is latency: a row waits until every older writing transaction has finished,
which for this engine's short transactions is a few milliseconds.

Several relays. Only one relay publishes at a time: a session-level advisory lock elects
the active relay and the others stand by, taking over if it dies (its connection closes
and PostgreSQL releases the lock). That keeps the published order the visibility order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import BrokerLogLost
from core.events import Envelope
from core.storage import Database, database_unavailable, sql_text

__all__ = ["OUTBOX_WRITE_LOCK", "OutboxRelay", "append_to_outbox", "append_to_outbox_raw"]

_log = logging.getLogger(__name__)
# Taken by writers before 2026-12 (and by migrations written then); nothing needs it now.
OUTBOX_WRITE_LOCK = 0x5550_4F42  # "UPOB"
_RELAY_LEADER_LOCK = 0x5550_524C  # "UPRL"

_INSERT_SQL = (
    "INSERT INTO outbox (event_id, topic, partition_key, event_type, envelope)"
    " SELECT * FROM unnest(CAST({} AS uuid[]), CAST({} AS text[]),"
    " CAST({} AS text[]), CAST({} AS text[]), CAST({} AS bytea[]))"
)
_INSERT = sql_text(_INSERT_SQL.format(":ids", ":topics", ":keys", ":types", ":envs"))
_INSERT_RAW = _INSERT_SQL.format("$1", "$2", "$3", "$4", "$5")


def _columns(envelopes: Sequence[Envelope]) -> dict[str, list[Any]]:
    return {
        "ids": [str(e.event_id) for e in envelopes],
        "topics": [e.topic for e in envelopes],
        "keys": [e.partition_key for e in envelopes],
        "types": [e.event_type for e in envelopes],
        "envs": [e.to_bytes() for e in envelopes],
    }


async def append_to_outbox(conn: AsyncConnection, envelopes: Sequence[Envelope]) -> None:
    """Add events to the current transaction's outbox (one statement; ``txid`` is set by
    the column's default)."""
    if envelopes:
        await conn.execute(_INSERT, _columns(envelopes))


async def append_to_outbox_raw(conn: asyncpg.Connection, envelopes: Sequence[Envelope]) -> None:
    """:func:`append_to_outbox` on an asyncpg connection (``Database.raw_transaction``)."""
    if envelopes:
        await conn.execute(_INSERT_RAW, *_columns(envelopes).values())


Publish = Callable[[Sequence[Envelope]], Awaitable[None]]
Position = tuple[int, int]  # (txid, id) of the last row published
_START: Position = (0, 0)
# Two statements, so that the scan's snapshot is taken after the one xmin comes from: every
# transaction below it has ended before the scan begins.
_XMIN = sql_text("SELECT pg_snapshot_xmin(pg_current_snapshot())")
_READ_AFTER = sql_text(
    "SELECT id, txid, envelope FROM outbox"
    " WHERE (txid, id) > (CAST(:t AS xid8), :id) AND txid < CAST(:xmin AS xid8)"
    " ORDER BY txid, id LIMIT :n"
)
_STORE_POSITION = sql_text(
    "INSERT INTO outbox_position (destination, last_txid, last_id)"
    " VALUES (:d, CAST(:t AS xid8), :id) ON CONFLICT (destination) DO UPDATE"
    " SET last_txid = EXCLUDED.last_txid, last_id = EXCLUDED.last_id, updated_at = now()"
)
_UNPUBLISHED = (
    "(txid, id) > COALESCE((SELECT (last_txid, last_id) FROM outbox_position"
    " WHERE destination = :d), (CAST('0' AS xid8), 0))"
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
        log_lost: Callable[[], Awaitable[None]] | None = None,
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
        self._bus_failing_since: float | None = None
        # A broker that can lose its log says so here (KafkaBus.log_lost, or by raising
        # BrokerLogLost from a publish): asked every few seconds while there is nothing
        # to publish.
        self._log_lost = log_lost
        self._probed_at = time.monotonic()

    def bus_down_for(self) -> float:
        """Seconds since publishing to the bus started failing (0 while it works)."""
        since = self._bus_failing_since
        return 0.0 if since is None else time.monotonic() - since

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
            except BrokerLogLost as exc:
                # What the broker lost may not all have been consumed: publish the whole
                # (retained) outbox again; every consumer's inbox drops what it had.
                _log.error("outbox relay: %s; publishing the outbox again from its start", exc)
                try:
                    async with self._db.connection() as conn:
                        await conn.execute(
                            _STORE_POSITION, {"d": self._destination, "t": 0, "id": 0}
                        )
                        await conn.commit()
                except Exception as store_failed:
                    _log.warning("outbox relay: cannot rewind yet: %s", store_failed)
                await self._sleep(0.2)
            except Exception as exc:
                # The database or the bus failed: nothing past the last stored position was
                # acknowledged, so starting over from it is safe (consumers drop repeats).
                if database_unavailable(exc) or self._bus_failing_since is not None:
                    _log.warning("outbox relay: %s; retrying", exc)  # expected: no traceback
                else:
                    _log.warning("outbox relay: %s; retrying", exc, exc_info=True)
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
        settled_at = read_at = await self._position(leader_conn)
        in_flight: deque[tuple[Position, int, asyncio.Future[None]]] = deque()
        try:
            while not self._stopping.is_set():
                settled = 0
                while in_flight and in_flight[0][2].done():
                    settled_at, count, task = in_flight.popleft()
                    try:
                        task.result()  # a failed publish raises: start over from the position
                    except Exception:
                        if self._bus_failing_since is None:
                            self._bus_failing_since = time.monotonic()
                        raise
                    self._bus_failing_since = None
                    settled += count
                if settled:
                    await self._store(leader_conn, settled_at, settled)
                if len(in_flight) >= self._max_in_flight:
                    await asyncio.wait({in_flight[0][2]})
                    continue
                xmin = (await leader_conn.execute(_XMIN)).scalar_one()
                rows = (
                    await leader_conn.execute(
                        _READ_AFTER,
                        {"t": read_at[0], "id": read_at[1], "xmin": xmin, "n": self._batch_size},
                    )
                ).all()
                await leader_conn.commit()
                if not rows:
                    await self._probe_log(bool(in_flight))
                    if in_flight:
                        await asyncio.wait({in_flight[0][2]}, timeout=self._poll)
                    else:
                        await self._sleep(self._poll)
                    continue
                batch = [Envelope.from_bytes(bytes(row.envelope)) for row in rows]
                read_at = (int(rows[-1].txid), rows[-1].id)
                task = asyncio.ensure_future(self._publish(batch))
                in_flight.append((read_at, len(batch), task))
            # Stopping: let what was handed over settle, and remember how far it got.
            settled = 0
            while in_flight:
                settled_at, count, task = in_flight.popleft()
                await task
                settled += count
            if settled:
                await self._store(leader_conn, settled_at, settled)
        finally:
            for _, _, task in in_flight:
                task.cancel()

    async def _probe_log(self, busy: bool) -> None:
        """Idle (and every 2 s at most): ask the bus whether it lost its log."""
        if self._log_lost is None or busy or time.monotonic() - self._probed_at < 2.0:
            return
        self._probed_at = time.monotonic()
        try:
            await self._log_lost()  # raises BrokerLogLost
        except BrokerLogLost:
            self._bus_failing_since = self._bus_failing_since or time.monotonic()
            raise
        except Exception as exc:  # the broker is down: publishing will say so
            _log.debug("outbox relay: log probe failed: %s", exc)

    async def _store(self, conn: AsyncConnection, at: Position, count: int) -> None:
        await conn.execute(_STORE_POSITION, {"d": self._destination, "t": at[0], "id": at[1]})
        await conn.commit()
        self.published += count
        if self.published - self._pruned_at >= self._prune_every:
            await self._prune(conn, at)

    async def _prune(self, conn: AsyncConnection, at: Position) -> None:
        """Forget rows published long ago; the compliance ledger is the permanent record."""
        await conn.execute(
            sql_text(
                "DELETE FROM outbox WHERE (txid, id) <= (CAST(:t AS xid8), :id)"
                " AND created_at < now() - make_interval(secs => :keep)"
            ),
            {"t": at[0], "id": at[1], "keep": self._retention_s},
        )
        await conn.commit()
        self._pruned_at = self.published

    async def _position(self, conn: AsyncConnection) -> Position:
        row = (
            await conn.execute(
                sql_text("SELECT last_txid, last_id FROM outbox_position WHERE destination = :d"),
                {"d": self._destination},
            )
        ).first()
        await conn.commit()
        return (int(row.last_txid), int(row.last_id)) if row is not None else _START

    async def backlog(self) -> int:
        """Rows committed but not yet published (for /readyz, drains and tests)."""
        async with self._db.connection() as conn:
            return int(
                (
                    await conn.execute(
                        sql_text("SELECT count(*) FROM outbox WHERE " + _UNPUBLISHED),
                        {"d": self._destination},
                    )
                ).scalar_one()
            )

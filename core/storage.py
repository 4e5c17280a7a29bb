"""Storage: the async engine, transactions and migrations (applied at start).

Every context owns its tables and lists its migrations (``<context>/migrations.py``); the
composition root hands them all to :func:`migrate`, which applies the missing ones in
order under an advisory lock, so processes starting together do not race.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.errors import StorageError

__all__ = [
    "APPLICATION_NAME",
    "Database",
    "Migration",
    "asyncpg_url",
    "database_unavailable",
    "migrate",
    "plain_url",
    "sql_text",
]

_log = logging.getLogger(__name__)
_MIGRATION_LOCK = 0x5550_4D49  # "UPMI"
_ACQUIRE_TIMEOUT_S = 30.0


# What the database says (or the driver sees) when it cannot take work now: not reachable,
# connection lost, shutting down or crashed, starting up or recovering, out of connections.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, no socket file, timed out
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,  # 57P03: starting up, in recovery
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
    PoolTimeout,  # no pooled connection came free in time
)


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unavailable (answer 503, retry later, never
    dead-letter for it) rather than that the work itself failed. Looks through the
    wrappers: SQLAlchemy's ``DBAPIError.orig`` and explicit ``raise … from``."""
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return False
        if isinstance(current, (StorageError, *_UNAVAILABLE)):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection is closed" in str(current):
            return True  # what asyncpg says when the server went away under a transaction
        current = getattr(current, "orig", None) or current.__cause__
    return False


@functools.lru_cache(maxsize=1024)
def sql_text(statement: str) -> TextClause:
    """``text(statement)``, built once per distinct statement and shared. SQLAlchemy finds
    a statement's compiled form by the clause's cache key, which it memoises on the clause:
    a fresh ``text()`` on every execution parsed the statement for its bind parameters and
    computed that key again, about a tenth of the engine's CPU per payment
    (docs/benchmarks.md). Clauses are immutable (``bindparams()`` returns a copy)."""
    return text(statement)


def _raise_if_unavailable(exc: BaseException, what: str, closed: bool = False) -> None:
    """Raise the StorageError ``exc`` means if it says the database is unavailable (or the
    connection is ``closed``); otherwise return, for the caller to re-raise ``exc``."""
    if closed or database_unavailable(exc):
        raise StorageError(f"{what}: {_reason(exc)}") from exc


@contextlib.asynccontextmanager
async def _guarded(
    context: contextlib.AbstractAsyncContextManager[AsyncConnection], at_exit: str
) -> AsyncIterator[AsyncConnection]:
    """SQLAlchemy's ``begin()`` or ``connect()``, with unavailability as StorageError:
    on entry, inside the block (the database's own errors only: an error of the work
    passes through as it is) and on exit (``at_exit``: a COMMIT whose fate is unknown)."""
    try:
        conn = await context.__aenter__()
    except Exception as exc:
        _raise_if_unavailable(exc, "database unreachable")
        raise
    try:
        yield conn
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the connection may be gone already
            await context.__aexit__(type(exc), exc, exc.__traceback__)
        if isinstance(exc, SQLAlchemyError | asyncpg.PostgresError):
            _raise_if_unavailable(exc, "database connection lost")
        raise
    else:
        try:
            await context.__aexit__(None, None, None)
        except Exception as exc:
            _raise_if_unavailable(exc, f"database {at_exit}")
            raise


def _gone(conn: asyncpg.Connection) -> bool:
    """Closed, or already taken back by the pool (which does that to a lost connection)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


def _reason(exc: BaseException) -> str:
    """The driver's own message, one line (not SQLAlchemy's wrapper text)."""
    inner = getattr(exc, "orig", None) or exc
    text_ = str(inner).strip().splitlines()
    return text_[0] if text_ else type(inner).__name__


async def _keep_session(conn: asyncpg.Connection) -> None:
    """asyncpg's default reset on release sends four statements (unlock all advisory locks,
    close cursors, unlisten, reset settings) each time; a connection of the raw pool only
    ever runs :meth:`Database.raw_transaction`'s transactions, which leave none of those
    behind (their advisory locks are transaction-scoped), so there is nothing to reset."""


@dataclass(frozen=True)
class Migration:
    id: str  # "<context>.<nnnn>_<what>", applied in list order
    sql: str


def asyncpg_url(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def plain_url(url: str) -> str:
    """The libpq form (for psql and other tools)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


# Every connection names its process: `keys rotate-master` refuses to run while another
# engine process holds connections (pg_stat_activity), since it would keep the old key.
APPLICATION_NAME = f"upi-engine:{os.getpid()}"


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = asyncpg_url(url)
        # No overflow: work beyond ``pool_size`` waits for a pooled connection. An overflow
        # connection is closed when it is given back to a full pool, so under steady load
        # (the consumers run many handlers at once) connections were opened and closed
        # ~20 times a second, each with asyncpg's type introspection: at 30 payments/s
        # that put the 202's p50 at 66-106 ms instead of 11 ms (docs/benchmarks.md).
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=0,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
        )
        self._pool_size = pool_size
        self._raw: asyncpg.Pool | None = None
        self._raw_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One unit of work: commits on success, rolls back on any error.

        Only the database's own failures become :class:`StorageError`; an error raised by
        the work inside the block passes through as it is.
        """
        async with _guarded(self.engine.begin(), "lost at commit") as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (or work that commits itself). Failures as in
        :meth:`transaction`."""
        async with _guarded(self.engine.connect(), "lost at close") as conn:
            yield conn

    async def _raw_pool(self) -> asyncpg.Pool:
        async with self._raw_lock:
            if self._raw is None:
                self._raw = await asyncpg.create_pool(
                    plain_url(self.url),
                    min_size=1,
                    max_size=self._pool_size,
                    reset=_keep_session,
                    server_settings={"application_name": APPLICATION_NAME},
                )
            return self._raw

    @contextlib.asynccontextmanager
    async def raw_transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction on asyncpg directly, for the hottest path (the gateway's payment
        initiation): no SQLAlchemy in between (it cost about as much CPU per statement as
        asyncpg itself, plus a ping per checkout), and asyncpg's cache of prepared
        statements per connection. Failures as in :meth:`transaction`."""
        async with self.raw_connection() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def raw_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the same asyncpg pool with no transaction open: each statement
        commits on its own (one round trip, its row locks held only while it runs).
        Failures as in :meth:`transaction`."""
        try:
            pool = await self._raw_pool()
            conn = await pool.acquire(timeout=_ACQUIRE_TIMEOUT_S)
        except Exception as exc:
            _raise_if_unavailable(exc, "database unreachable")
            raise
        try:
            yield conn
        except asyncpg.InternalClientError as exc:
            # A connection cut in the middle of a reply can be left in a protocol state
            # asyncpg reports as "another operation is in progress": it is no use any
            # more. Dropped, so that the pool opens a fresh one; the request may retry.
            with contextlib.suppress(asyncpg.InterfaceError):  # released by the pool already
                conn.terminate()
            raise StorageError(f"database connection broken: {_reason(exc)}") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # A closed connection after an error: the server went away under it.
            _raise_if_unavailable(exc, "database connection lost", _gone(conn))
            raise
        finally:
            with contextlib.suppress(Exception):
                await pool.release(conn)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        async def select_one() -> None:
            async with self.engine.connect() as conn:
                await conn.execute(sql_text("SELECT 1"))

        try:
            await asyncio.wait_for(select_one(), timeout_s)  # a blackholed server: no hang
            return True
        except (SQLAlchemyError, OSError, asyncpg.PostgresError):
            return False

    async def close(self) -> None:
        if self._raw is not None:
            await self._raw.close()
            self._raw = None
        await self.engine.dispose()


async def migrate(db: Database, migrations: Sequence[Migration]) -> list[str]:
    """Apply the migrations not yet applied; returns their ids."""
    applied: list[str] = []
    async with db.transaction() as conn:
        await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        await conn.execute(
            sql_text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        done = set((await conn.execute(sql_text("SELECT id FROM schema_migrations"))).scalars())
        for migration in migrations:
            if migration.id in done:
                continue
            # Migrations hold several statements: run them through asyncpg's simple
            # query protocol, inside this same transaction.
            raw = await conn.get_raw_connection()
            await raw.driver_connection.execute(migration.sql)  # type: ignore[union-attr]
            await conn.execute(
                sql_text("INSERT INTO schema_migrations (id) VALUES (:id)"), {"id": migration.id}
            )
            applied.append(migration.id)
    if applied:
        _log.info("applied migrations", extra={"migrations": applied})
    return applied

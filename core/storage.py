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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.errors import StorageError

__all__ = ["Database", "Migration", "asyncpg_url", "migrate", "plain_url", "sql_text"]

_log = logging.getLogger(__name__)
_MIGRATION_LOCK = 0x5550_4D49  # "UPMI"


@functools.lru_cache(maxsize=1024)
def sql_text(statement: str) -> TextClause:
    """``text(statement)``, built once per distinct statement and shared. SQLAlchemy finds
    a statement's compiled form by the clause's cache key, which it memoises on the clause:
    a fresh ``text()`` on every execution parsed the statement for its bind parameters and
    computed that key again, about a tenth of the engine's CPU per payment
    (docs/benchmarks.md). Clauses are immutable (``bindparams()`` returns a copy)."""
    return text(statement)


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
        begin = self.engine.begin()
        try:
            conn = await begin.__aenter__()
        except (OSError, ConnectionError) as exc:
            raise StorageError(f"database unreachable: {exc}") from exc
        try:
            yield conn
        except BaseException as exc:
            await begin.__aexit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                raise StorageError(f"database connection lost: {exc.orig}") from exc
            raise
        else:
            await begin.__aexit__(None, None, None)

    async def _raw_pool(self) -> asyncpg.Pool:
        async with self._raw_lock:
            if self._raw is None:
                self._raw = await asyncpg.create_pool(
                    plain_url(self.url),
                    min_size=1,
                    max_size=self._pool_size,
                    reset=_keep_session,
                )
            return self._raw

    @contextlib.asynccontextmanager
    async def raw_transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction on asyncpg directly, for the hottest path (the gateway's payment
        initiation): no SQLAlchemy in between (it cost about as much CPU per statement as
        asyncpg itself, plus a ping per checkout), and asyncpg's cache of prepared
        statements per connection. Failures as in :meth:`transaction`."""
        try:
            pool = await self._raw_pool()
            conn = await pool.acquire()
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"database unreachable: {exc}") from exc
        try:
            async with conn.transaction():
                yield conn
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"database connection lost: {exc}") from exc
        finally:
            await pool.release(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sql_text("SELECT 1"))
            return True
        except (SQLAlchemyError, OSError):
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

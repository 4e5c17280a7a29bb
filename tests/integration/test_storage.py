"""The database handle on the real PostgreSQL."""

import asyncio

import pytest
from sqlalchemy import event

from core.storage import Database, sql_text

pytestmark = pytest.mark.postgres


async def test_bursts_beyond_the_pool_wait_and_do_not_open_connections(db_url):
    """More work at once than the pool holds waits for a pooled connection. It must not
    open (and then close) extra connections: that churn, each new connection with
    asyncpg's type introspection, cost the engine most of its latency under load."""
    db = Database(db_url, pool_size=3)
    opened: list[object] = []
    event.listen(db.engine.sync_engine, "connect", lambda conn, record: opened.append(conn))
    in_flight = most = 0

    async def unit(n: int) -> int:
        nonlocal in_flight, most
        async with db.transaction() as conn:
            in_flight += 1
            most = max(most, in_flight)
            query = sql_text("SELECT CAST(:n AS int) FROM pg_sleep(0.01)")
            value = (await conn.execute(query, {"n": n})).scalar_one()
            in_flight -= 1
            return int(value)

    try:
        for burst in range(4):
            results = await asyncio.gather(*(unit(burst * 100 + i) for i in range(20)))
            assert results == [burst * 100 + i for i in range(20)]  # nothing lost
        assert most <= 3
        assert len(opened) <= 3
    finally:
        await db.close()


def test_a_statement_is_one_shared_clause():
    """Built once: SQLAlchemy memoises the compiled-cache key on the clause object, and the
    burst test above runs the one clause concurrently with different parameters."""
    assert sql_text("SELECT 1") is sql_text("SELECT 1")
    assert sql_text("SELECT 1") is not sql_text("SELECT 2")

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from api.bootstrap import all_migrations, simulator_migrations
from core.storage import Database, migrate
from tests.support import embedded_postgres_server, tansu_broker, unique_name

os.environ.setdefault("UPI_LOG_LEVEL", "WARNING")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with the most slow tests first, each file's slow tests first, otherwise in
    collected order: ``scripts/test`` hands a file to one worker at a time in this order,
    and a long file started last would set the suite's wall time on its own."""
    slow_in_file = Counter(
        item.location[0] for item in items if item.get_closest_marker("slow") is not None
    )
    # A stable sort: the collected order stands within each key.
    items.sort(
        key=lambda item: (
            -slow_in_file[item.location[0]],
            item.get_closest_marker("slow") is None,
        )
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """One real PostgreSQL for the session; yields a URL template with ``{db}``."""
    with embedded_postgres_server() as (_server, url):
        asyncio.run(_make_template(url))
        yield url


async def _make_template(url: str) -> None:
    admin = create_async_engine(url.format(db="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text("CREATE DATABASE upi_template"))
    await admin.dispose()
    db = Database(url.format(db="upi_template"))
    await migrate(db, [*all_migrations(), *simulator_migrations()])  # the in-process mock's too
    await db.close()


async def _fresh_database(pg_server: str) -> str:
    name = unique_name("t")
    admin = create_async_engine(pg_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE upi_template'))
    await admin.dispose()
    return pg_server.format(db=name)


@pytest.fixture
async def db_url(pg_server: str) -> str:
    """A fresh, migrated database for one test."""
    return await _fresh_database(pg_server)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.close()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with tansu_broker() as bootstrap:
        yield bootstrap

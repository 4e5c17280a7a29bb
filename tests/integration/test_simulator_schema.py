"""The switch simulator's tables are its own (issue 15, part 8): in the schema ``npci_sim``,
made by its own migrations only where it runs; none is left in the payments context's
(``public``). A database laid out the old way keeps its mock balances, journal, calls and
disputes through payments.0014's handover, in the same shape as the simulator's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from api.bootstrap import all_migrations, simulator_migrations
from core.storage import Database, migrate
from tests.support import unique_name

pytestmark = pytest.mark.postgres

SIMULATOR_TABLES = ["accounts", "api_calls", "disputes", "transactions"]
AT = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


@pytest.fixture
async def empty_db(pg_server: str) -> AsyncIterator[Database]:
    """A database with nothing migrated."""
    name = unique_name("s")
    admin = create_async_engine(pg_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    db = Database(pg_server.format(db=name))
    yield db
    await db.close()


async def tables(db: Database, schema: str) -> list[str]:
    async with db.connection() as conn:
        found = await conn.execute(
            text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"
                " ORDER BY table_name"
            ),
            {"s": schema},
        )
        return list(found.scalars())


async def layout(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """The simulator schema's shape: columns, constraints, indexes and sequences."""
    async with db.connection() as conn:

        async def rows(sql: str) -> list[tuple[object, ...]]:
            return [tuple(r) for r in await conn.execute(text(sql))]

        return {
            "columns": await rows(
                "SELECT table_name, ordinal_position, column_name, data_type, is_nullable,"
                " column_default, is_identity FROM information_schema.columns"
                " WHERE table_schema = 'npci_sim' ORDER BY 1, 2"
            ),
            "constraints": await rows(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                " FROM pg_constraint WHERE connamespace = 'npci_sim'::regnamespace"
                " ORDER BY 1, 2"
            ),
            "indexes": await rows(
                "SELECT tablename, indexname, indexdef FROM pg_indexes"
                " WHERE schemaname = 'npci_sim' ORDER BY 1, 2"
            ),
            "sequences": await rows(
                "SELECT sequence_name FROM information_schema.sequences"
                " WHERE sequence_schema = 'npci_sim' ORDER BY 1"
            ),
        }


async def test_a_fresh_database_has_the_simulator_tables_in_npci_sim_and_none_in_public(db):
    assert await tables(db, "npci_sim") == SIMULATOR_TABLES
    public = await tables(db, "public")
    assert "payments" in public  # the engine's own are there
    assert [t for t in public if t.startswith("npci")] == []


async def test_with_a_real_switch_no_table_of_the_simulator_exists(empty_db):
    """``UPI_NPCI_URL`` set: the engine runs only its own migrations."""
    await migrate(empty_db, all_migrations())
    assert await tables(empty_db, "npci_sim") == []
    assert [t for t in await tables(empty_db, "public") if t.startswith("npci")] == []
    async with empty_db.connection() as conn:
        schema = await conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = 'npci_sim'"))
        assert schema.first() is None


async def test_the_simulator_alone_makes_its_tables_in_the_engines_shape(db, empty_db):
    """An ``npci-mock`` on a database of its own makes the same tables as the handover."""
    await migrate(empty_db, simulator_migrations())
    assert await tables(empty_db, "npci_sim") == SIMULATOR_TABLES
    assert await tables(empty_db, "public") == ["schema_migrations"]
    assert await layout(empty_db) == await layout(db)


async def old_layout(db: Database) -> None:
    """The migrations up to payments.0013 (public.npci_*), and rows in every mock table."""
    migrations = all_migrations()
    cut = next(i for i, m in enumerate(migrations) if m.id.startswith("payments.0014"))
    await migrate(db, migrations[:cut])
    async with db.transaction() as conn:
        await conn.execute(
            text(
                "INSERT INTO npci_accounts (vpa, bank, balance_paise) VALUES"
                " ('ravi@okhdfc', 'HDFC', 99000), ('shop@okicici', 'ICICI', 1000)"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO npci_transactions (txn_id, kind, payer_vpa, payee_vpa, payer_bank,"
                " payee_bank, amount_paise, status, response_code, rrn, debited, created_at,"
                " visible_at, late_at) VALUES ('UPI-OLD-1', 'PAY', 'ravi@okhdfc',"
                " 'shop@okicici', 'HDFC', 'ICICI', 1000, 'SUCCESS', '00', '123456789012', true,"
                " :at, :at, :at)"
            ),
            {"at": AT},
        )
        await conn.execute(
            text(
                "INSERT INTO npci_api_calls (txn_id, api, called_at, outcome) VALUES"
                " ('UPI-OLD-1', 'check_status', :at, 'answered')"
            ),
            {"at": AT},
        )
        await conn.execute(
            text(
                "INSERT INTO npci_disputes (dispute_id, txn_id, payer_vpa, payee_vpa, payer_bank,"
                " payee_bank, amount_paise, reason, raised_at, respond_by, status, changed_at)"
                " VALUES ('DSP-OLD-1', 'UPI-OLD-1', 'ravi@okhdfc', 'shop@okicici', 'HDFC',"
                " 'ICICI', 1000, 'duplicate', :at, :at, 'OPEN', :at)"
            ),
            {"at": AT},
        )


async def assert_kept(db: Database) -> None:
    assert await tables(db, "npci_sim") == SIMULATOR_TABLES
    assert [t for t in await tables(db, "public") if t.startswith("npci")] == []
    async with db.transaction() as conn:
        balances = await conn.execute(
            text("SELECT vpa, balance_paise FROM npci_sim.accounts ORDER BY vpa")
        )
        assert [tuple(r) for r in balances] == [("ravi@okhdfc", 99000), ("shop@okicici", 1000)]
        journal = (
            await conn.execute(text("SELECT txn_id, debited, late_at FROM npci_sim.transactions"))
        ).one()
        assert tuple(journal) == ("UPI-OLD-1", True, AT)
        dispute = await conn.execute(text("SELECT dispute_id, status FROM npci_sim.disputes"))
        assert [tuple(r) for r in dispute] == [("DSP-OLD-1", "OPEN")]
        # The identity sequence moved with its table: the next call gets the next id.
        new_id = await conn.execute(
            text(
                "INSERT INTO npci_sim.api_calls (txn_id, api, called_at, outcome)"
                " VALUES ('UPI-OLD-1', 'reversal', :at, 'answered') RETURNING id"
            ),
            {"at": AT},
        )
        assert new_id.scalar_one() == 2


async def test_an_old_database_keeps_its_mock_data_through_the_engines_migrations(db, empty_db):
    await old_layout(empty_db)
    await migrate(empty_db, [*all_migrations(), *simulator_migrations()])
    await assert_kept(empty_db)
    # Moved, the tables have the shape (names of indexes, constraints, sequence included)
    # of those the simulator makes itself.
    assert await layout(empty_db) == await layout(db)


async def test_an_old_database_keeps_its_mock_data_when_npci_mock_is_upgraded_first(empty_db):
    """The ``npci-mock`` process on the engine's database, migrated before the engine:
    the simulator's own migration does the same handover, and payments.0014 then finds
    nothing left to move."""
    await old_layout(empty_db)
    await migrate(empty_db, simulator_migrations())
    await migrate(empty_db, all_migrations())
    await assert_kept(empty_db)


async def test_a_fresh_database_shared_with_npci_mock_started_first(empty_db):
    """The simulator's tables first (npci-mock), then the engine's migrations: 0002 etc.
    make the old empty tables again, and 0014 drops them."""
    await migrate(empty_db, simulator_migrations())
    async with empty_db.transaction() as conn:
        await conn.execute(text("INSERT INTO npci_sim.accounts VALUES ('ravi@okhdfc', 'HDFC', 5)"))
    await migrate(empty_db, all_migrations())
    assert await tables(empty_db, "npci_sim") == SIMULATOR_TABLES
    assert [t for t in await tables(empty_db, "public") if t.startswith("npci")] == []
    async with empty_db.connection() as conn:
        kept = await conn.execute(text("SELECT balance_paise FROM npci_sim.accounts"))
        assert kept.scalar_one() == 5

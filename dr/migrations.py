"""Tables of the DR context."""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "dr.0001_failovers",
        """
        -- Every failover this database took part in as the new primary, with its phases.
        CREATE TABLE dr_failovers (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            old_primary  text NOT NULL,
            new_primary  text NOT NULL,
            reason       text NOT NULL,
            started_at   timestamptz NOT NULL,
            completed_at timestamptz NOT NULL,
            phases       jsonb NOT NULL
        );
        """,
    ),
]

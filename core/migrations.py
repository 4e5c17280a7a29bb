"""Tables of the shared kernel: outbox, inbox, dead letters."""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "core.0001_outbox_inbox",
        """
        CREATE TABLE outbox (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id      uuid NOT NULL UNIQUE,
            topic         text NOT NULL,
            partition_key text NOT NULL,
            event_type    text NOT NULL,
            envelope      bytea NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        );
        -- How far each relay destination has published, by outbox id.
        CREATE TABLE outbox_position (
            destination text PRIMARY KEY,
            last_id     bigint NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE inbox (
            consumer     text NOT NULL,
            event_id     uuid NOT NULL,
            processed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, event_id)
        );
        CREATE TABLE dead_letters (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            consumer    text NOT NULL,
            topic       text NOT NULL,
            event_id    uuid,
            event_type  text,
            raw         bytea NOT NULL,
            reason      text NOT NULL,
            attempts    int NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        "core.0002_outbox_visibility_order",
        """
        -- The relay reads by transaction visibility (core/outbox.py). Rows already here get
        -- this migration's transaction id, and each position moves to it, keeping its id:
        -- what was published stays published, what was not is read next.
        ALTER TABLE outbox ADD COLUMN txid xid8;
        UPDATE outbox SET txid = pg_current_xact_id();
        ALTER TABLE outbox ALTER COLUMN txid SET DEFAULT pg_current_xact_id(),
                           ALTER COLUMN txid SET NOT NULL;
        CREATE INDEX outbox_by_visibility ON outbox (txid, id);
        ALTER TABLE outbox_position ADD COLUMN last_txid xid8;
        UPDATE outbox_position SET last_txid = pg_current_xact_id();
        ALTER TABLE outbox_position ALTER COLUMN last_txid SET NOT NULL;
        """,
    ),
    Migration(
        "core.0003_master_key_check",
        """
        -- A value sealed under the master key, to refuse an engine started with another
        -- key, and the pseudonym key, sealed, so that it outlives a master-key rotation
        -- (core/keyring.py). One row, written by the first engine.
        CREATE TABLE master_key_check (
            id                   int PRIMARY KEY CHECK (id = 1),
            check_sealed         bytea NOT NULL,
            pseudonym_key_sealed bytea NOT NULL,
            created_at           timestamptz NOT NULL DEFAULT now(),
            rotated_at           timestamptz
        );
        """,
    ),
    Migration(
        "core.0004_field_key",
        """
        -- The PII field key (core/crypto.py MasterKey.seal_pii), sealed like the pseudonym
        -- key: operational rows and events hold PII sealed under it, never in clear. The
        -- first engine after this step stores it (core/keyring.py bind_master_key).
        ALTER TABLE master_key_check ADD COLUMN field_key_id text;
        ALTER TABLE master_key_check ADD COLUMN field_key_sealed bytea;
        """,
    ),
]

"""Tables of the compliance ledger. Nothing here holds PII in clear: payloads are sealed."""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "compliance.0001_ledger",
        """
        -- Data keys, wrapped by the master key. Crypto-shredding sets wrapped to NULL.
        CREATE TABLE ledger_keys (
            key_id       text PRIMARY KEY,
            wrapped      bytea,
            active       boolean NOT NULL DEFAULT false,
            created_at   timestamptz NOT NULL,
            destroyed_at timestamptz
        );
        CREATE UNIQUE INDEX ledger_one_active_key ON ledger_keys (active) WHERE active;
        CREATE TABLE ledger_signing_keys (
            key_id          text PRIMARY KEY,
            wrapped_private bytea NOT NULL,
            public_pem      text NOT NULL,
            active          boolean NOT NULL DEFAULT false,
            created_at      timestamptz NOT NULL
        );
        CREATE UNIQUE INDEX ledger_one_active_signing_key ON ledger_signing_keys (active)
            WHERE active;
        CREATE TABLE ledger_entries (
            height         bigint PRIMARY KEY,
            event_id       uuid NOT NULL UNIQUE,
            event_type     text NOT NULL,
            transaction_id text NOT NULL,
            recorded_at    text NOT NULL,
            key_id         text NOT NULL,
            nonce          bytea NOT NULL,
            ciphertext     bytea NOT NULL,
            prev_hash      bytea NOT NULL,
            entry_hash     bytea NOT NULL
        );
        CREATE INDEX ledger_by_transaction ON ledger_entries (transaction_id)
            WHERE transaction_id <> '';
        CREATE TABLE ledger_checkpoints (
            height         bigint PRIMARY KEY,
            head_hash      bytea NOT NULL,
            merkle_root    bytea NOT NULL,
            signed_at      text NOT NULL,
            signing_key_id text NOT NULL,
            signature      bytea NOT NULL
        );
        -- The writer's running state: head and the Merkle frontier (O(log n) hashes).
        CREATE TABLE ledger_state (
            id                  int PRIMARY KEY CHECK (id = 1),
            size                bigint NOT NULL,
            head_hash           bytea NOT NULL,
            frontier            bytea[] NOT NULL,
            checkpoint_height   bigint NOT NULL,
            checkpoint_at       timestamptz NOT NULL
        );
        -- Where `ledger verify` can resume: the last checkpoint it verified.
        CREATE TABLE ledger_verified (
            id          int PRIMARY KEY CHECK (id = 1),
            height      bigint NOT NULL,
            head_hash   bytea NOT NULL,
            frontier    bytea[] NOT NULL,
            verified_at timestamptz NOT NULL
        );
        """,
    ),
]

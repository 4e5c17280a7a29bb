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
    Migration(
        "compliance.0002_tree_witnesses_v2",
        """
        -- The Merkle tree, stored as tiles (compliance/tree.py): tile (level, idx) holds up
        -- to 256 consecutive nodes of tree level 8*level, 32 bytes each, concatenated.
        CREATE TABLE ledger_tiles (
            level  smallint NOT NULL,
            idx    bigint NOT NULL,
            hashes bytea NOT NULL,
            PRIMARY KEY (level, idx)
        );
        -- tiled: entries the tiles cover (the writer catches up an older ledger's tiles).
        -- v2_from: the height from which entries are sealed in format 2 (framed AAD); an
        -- existing ledger moves to v2 at its size now, without rewriting a row.
        ALTER TABLE ledger_state ADD COLUMN tiled bigint NOT NULL DEFAULT 0;
        ALTER TABLE ledger_state ADD COLUMN v2_from bigint NOT NULL DEFAULT 0;
        UPDATE ledger_state SET v2_from = size;
        -- Witnesses the operator relies on, and their cosignatures of checkpoints.
        CREATE TABLE ledger_witnesses (
            witness_key_id text PRIMARY KEY,
            name           text NOT NULL,
            public_pem     text NOT NULL,
            created_at     timestamptz NOT NULL
        );
        CREATE TABLE ledger_cosignatures (
            height         bigint NOT NULL REFERENCES ledger_checkpoints (height),
            witness_key_id text NOT NULL REFERENCES ledger_witnesses (witness_key_id),
            cosigned_at    text NOT NULL,
            signature      bytea NOT NULL,
            received_at    timestamptz NOT NULL,
            PRIMARY KEY (height, witness_key_id)
        );
        CREATE INDEX ledger_cosignatures_by_witness ON ledger_cosignatures
            (witness_key_id, height DESC);
        """,
    ),
    Migration(
        "compliance.0003_data_key_use",
        """
        -- How many entries each data key sealed: the writer starts a new key past a count
        -- (and an age), compliance/keys.py. Keys already in use are counted once here.
        ALTER TABLE ledger_keys ADD COLUMN sealed_entries bigint NOT NULL DEFAULT 0;
        UPDATE ledger_keys k SET sealed_entries =
            (SELECT count(*) FROM ledger_entries e WHERE e.key_id = k.key_id);
        """,
    ),
]

"""Tables of the API layer: principals (merchant API keys, auditor and operator tokens) and
the rate limits' token buckets."""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "api.0001_principals",
        """
        CREATE TABLE principals (
            principal_id text PRIMARY KEY,
            role         text NOT NULL CHECK (role IN ('merchant', 'auditor', 'operator')),
            name         text NOT NULL,
            merchant_id  text,
            -- SHA-256 of the token: tokens are 256-bit random, so a fast hash is enough;
            -- the token itself is shown once and never stored.
            token_hash   bytea NOT NULL UNIQUE,
            created_at   timestamptz NOT NULL DEFAULT now(),
            CHECK ((role = 'merchant') = (merchant_id IS NOT NULL))
        );
        """,
    ),
    Migration(
        "api.0002_rate_limit_buckets",
        """
        -- One token bucket per limited key (api/ratelimit.py), shared by every gateway
        -- process on this database. UNLOGGED: no WAL, so a take commits without a flush and
        -- the table is not replicated; after a crash or a failover it starts empty, every
        -- bucket full again. Losing it loses nothing but some seconds of rate limiting.
        CREATE UNLOGGED TABLE rate_limit_buckets (
            bucket      text PRIMARY KEY,        -- e.g. 'merchant:<merchant_id>'
            tokens      float8 NOT NULL,         -- left after the last take
            refilled_at timestamptz NOT NULL,    -- the time ``tokens`` was counted at
            granted     int NOT NULL             -- tokens the last take got (0: refused)
        ) WITH (fillfactor = 50);                -- room for HOT updates in the page
        """,
    ),
    Migration(
        "api.0003_credentials",
        """
        -- Several credentials per principal (api/auth.py): each with an id, a prefix to
        -- recognise it by, a creation time, an optional expiry (a rotated key's grace
        -- period), revocation and a last-used time. The principals' own token_hash moves
        -- here; a token from before this migration has no known prefix.
        CREATE TABLE credentials (
            credential_id text PRIMARY KEY,
            principal_id  text NOT NULL REFERENCES principals (principal_id),
            prefix        text NOT NULL,
            token_hash    bytea NOT NULL UNIQUE,
            created_at    timestamptz NOT NULL DEFAULT now(),
            expires_at    timestamptz,
            revoked_at    timestamptz,
            last_used_at  timestamptz
        );
        CREATE INDEX credentials_by_principal ON credentials (principal_id, created_at);
        INSERT INTO credentials (credential_id, principal_id, prefix, token_hash, created_at)
        SELECT 'cred_' || substr(md5(principal_id), 1, 20), principal_id,
               CASE role WHEN 'merchant' THEN 'upi_sk_' WHEN 'auditor' THEN 'upi_au_'
                    ELSE 'upi_op_' END,
               token_hash, created_at
        FROM principals;
        ALTER TABLE principals ALTER COLUMN token_hash DROP NOT NULL;
        UPDATE principals SET token_hash = NULL;
        """,
    ),
]

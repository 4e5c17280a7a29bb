"""Tables of the API layer: principals (merchant API keys, auditor and operator tokens)."""

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
]

"""Tables of the fraud context: the history the scorers read. Keys are keyed pseudonyms
(:meth:`core.crypto.MasterKey.pseudonym`) of the payer's VPA, the device id and the payee's
VPA: no VPA or device id is stored in clear."""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "fraud.0001_history",
        """
        CREATE TABLE fraud_observations (
            id             bigserial PRIMARY KEY,
            transaction_id text NOT NULL UNIQUE,
            payer_key      bytea NOT NULL,
            device_key     bytea,
            payee_key      bytea NOT NULL,
            amount_paise   bigint NOT NULL,
            at             timestamptz NOT NULL,
            lat            double precision,
            lon            double precision
        );
        CREATE INDEX fraud_obs_payer ON fraud_observations (payer_key, id);
        CREATE INDEX fraud_obs_payer_at ON fraud_observations (payer_key, at);
        CREATE INDEX fraud_obs_device_at ON fraud_observations (device_key, at)
            WHERE device_key IS NOT NULL;
        CREATE INDEX fraud_obs_payee_at ON fraud_observations (payee_key, at);
        CREATE TABLE fraud_payers (
            payer_key bytea PRIMARY KEY,
            payments  bigint NOT NULL
        );
        CREATE TABLE fraud_payer_devices (
            payer_key  bytea NOT NULL,
            device_key bytea NOT NULL,
            first_seen timestamptz NOT NULL,
            PRIMARY KEY (payer_key, device_key)
        );
        """,
    ),
    Migration(
        "fraud.0002_history_by_time",
        """
        -- The pruner deletes by age (UPI_FRAUD_HISTORY_DAYS).
        CREATE INDEX fraud_obs_at ON fraud_observations (at);
        """,
    ),
    Migration(
        "fraud.0003_payee_and_device_windows",
        """
        -- Issue 18: whether a payment was its payer's first (the share of new payers in a
        -- payee's window), the payer's last payment (pruning the per-payer rows).
        ALTER TABLE fraud_observations ADD COLUMN payer_new boolean NOT NULL DEFAULT false;
        ALTER TABLE fraud_payers ADD COLUMN last_seen timestamptz;
        UPDATE fraud_payers p SET last_seen = coalesce(
            (SELECT max(o.at) FROM fraud_observations o WHERE o.payer_key = p.payer_key), now());
        ALTER TABLE fraud_payers ALTER COLUMN last_seen SET NOT NULL;
        CREATE INDEX fraud_payers_last_seen ON fraud_payers (last_seen);
        -- The windows read only these columns: covering indexes make each window an
        -- index-only scan (the payee's latest payments, its first; the device's payers in
        -- 10 min and 24 h; the payer's amounts and devices in 24 h).
        CREATE INDEX fraud_obs_payee_window ON fraud_observations (payee_key, at, id)
            INCLUDE (payer_key, payer_new);
        DROP INDEX fraud_obs_payee_at;
        CREATE INDEX fraud_obs_device_window ON fraud_observations (device_key, at)
            INCLUDE (payer_key) WHERE device_key IS NOT NULL;
        DROP INDEX fraud_obs_device_at;
        CREATE INDEX fraud_obs_payer_window ON fraud_observations (payer_key, at)
            INCLUDE (amount_paise, device_key);
        DROP INDEX fraud_obs_payer_at;
        """,
    ),
]

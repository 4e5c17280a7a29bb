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
]

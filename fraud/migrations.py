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
        -- payee's window). The windows' reads use the indexes there are: the payee's
        -- latest payments and its first one (payee_key, at), the device's payers in
        -- 10 min (device_key, at), the payer's devices in 24 h (payer_key, at).
        ALTER TABLE fraud_observations ADD COLUMN payer_new boolean NOT NULL DEFAULT false;
        -- Payers (and their devices) whose payments were all pruned before pruning reached
        -- these tables; from now on the pruner removes them with their last payment.
        DELETE FROM fraud_payers p WHERE NOT EXISTS (
            SELECT 1 FROM fraud_observations o WHERE o.payer_key = p.payer_key);
        DELETE FROM fraud_payer_devices d WHERE NOT EXISTS (
            SELECT 1 FROM fraud_payers p WHERE p.payer_key = d.payer_key);
        """,
    ),
    Migration(
        "fraud.0004_sealed_places",
        """
        -- Locations are PII (SPEC §1): a payment's place is sealed (place_pii, under the
        -- PII field key, bound to its transaction id) and its 0.1° cell kept as a keyed
        -- pseudonym (cell_key), which the usual places are counted by. SQL has no key:
        -- the clear lat/lon of rows from before are sealed by the first fraud worker that
        -- starts after this step (fraud/store.py seal_clear_places), which empties them.
        ALTER TABLE fraud_observations ADD COLUMN cell_key bytea;
        ALTER TABLE fraud_observations ADD COLUMN place_pii bytea;
        CREATE INDEX fraud_obs_clear_places ON fraud_observations (id) WHERE lat IS NOT NULL;
        """,
    ),
    Migration(
        "fraud.0005_usual_amounts",
        """
        -- Issue 18, bursts and collect requests: each payer's usual amount, as the sum of
        -- its payments' round(1000 * log10 amount) (a geometric mean with the count), and
        -- whether each payment was well above its payer's usual (fraud.features
        -- large_vs_usual), for the payee's window: a young payee paid far above their
        -- usual by several customers. Payers from before get the sum of their kept
        -- payments scaled to their count (their pruned payments' amounts are gone).
        ALTER TABLE fraud_payers ADD COLUMN milli_log_sum bigint NOT NULL DEFAULT 0;
        ALTER TABLE fraud_observations ADD COLUMN payer_large boolean NOT NULL DEFAULT false;
        UPDATE fraud_payers p SET milli_log_sum = s.total * p.payments / s.n
        FROM (
            SELECT payer_key, count(*) AS n,
                   sum(round(1000 * log(greatest(amount_paise, 1)::numeric)))::bigint AS total
            FROM fraud_observations GROUP BY payer_key
        ) AS s
        WHERE s.payer_key = p.payer_key;
        """,
    ),
]

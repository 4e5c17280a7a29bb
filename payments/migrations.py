"""Tables of the payments context (gateway, NPCI handler) and of the mock NPCI switch.

The mock switch keeps its own tables (``npci_*``): in a real deployment they would be
NPCI's and the banks' systems, never ours. It shares the database only for convenience.
"""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "payments.0001_merchants_payments",
        """
        CREATE TABLE merchants (
            merchant_id        text PRIMARY KEY,
            name               text NOT NULL,
            vpa                text NOT NULL,
            mcc                text NOT NULL,
            webhook_url        text,
            webhook_secret_enc bytea NOT NULL,
            created_at         timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE payments (
            transaction_id    text PRIMARY KEY,
            merchant_id       text NOT NULL REFERENCES merchants,
            merchant_order_id text NOT NULL,
            payer_vpa         text NOT NULL,
            payee_vpa         text NOT NULL,
            amount_paise      bigint NOT NULL CHECK (amount_paise > 0),
            currency          char(3) NOT NULL DEFAULT 'INR',
            note              text,
            device            jsonb,
            status            text NOT NULL,
            response_code     text,
            rrn               text,
            payer_bank        text,
            payee_bank        text,
            fraud             jsonb,
            created_at        timestamptz NOT NULL,
            updated_at        timestamptz NOT NULL,
            completed_at      timestamptz
        );
        CREATE INDEX payments_by_order ON payments (merchant_id, merchant_order_id, created_at);
        -- Append-only state history. The partial unique index makes a second final status
        -- for one payment impossible at the database level, whatever the code does.
        CREATE TABLE payment_status_history (
            transaction_id text NOT NULL REFERENCES payments,
            seq            int NOT NULL,
            status         text NOT NULL,
            response_code  text,
            reason         text,
            at             timestamptz NOT NULL,
            PRIMARY KEY (transaction_id, seq)
        );
        CREATE UNIQUE INDEX payment_one_final_status ON payment_status_history (transaction_id)
            WHERE status IN ('SUCCESS', 'FAILED', 'BLOCKED', 'REVERSED');
        CREATE TABLE idempotency_keys (
            merchant_id     text NOT NULL,
            idempotency_key text NOT NULL,
            request_hash    bytea NOT NULL,
            transaction_id  text NOT NULL,
            response_status int NOT NULL,
            response_body   jsonb NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (merchant_id, idempotency_key)
        );
        """,
    ),
    Migration(
        "payments.0002_npci_mock",
        """
        CREATE TABLE npci_accounts (
            vpa           text PRIMARY KEY,
            bank          text NOT NULL,
            balance_paise bigint NOT NULL CHECK (balance_paise >= 0)
        );
        -- The switch's own journal: one row per transaction it saw, keyed by our txn id,
        -- so a repeated pay request can never debit twice.
        CREATE TABLE npci_transactions (
            txn_id        text PRIMARY KEY,
            kind          text NOT NULL,
            payer_vpa     text NOT NULL,
            payee_vpa     text NOT NULL,
            payer_bank    text NOT NULL,
            payee_bank    text NOT NULL,
            amount_paise  bigint NOT NULL CHECK (amount_paise > 0),
            status        text NOT NULL,
            response_code text NOT NULL,
            rrn           text NOT NULL,
            debited       boolean NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            updated_at    timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        "payments.0003_deemed_and_reversals",
        """
        -- Deemed payments: when to ask check-status next, and how often we asked.
        ALTER TABLE payments ADD COLUMN next_check_at timestamptz;
        ALTER TABLE payments ADD COLUMN check_attempts int NOT NULL DEFAULT 0;
        CREATE INDEX payments_deemed_due ON payments (next_check_at) WHERE status = 'DEEMED';
        -- Mock switch: an answer stays pending (check-status 01) until visible_at; refunds
        -- point at the payment they credit back.
        ALTER TABLE npci_transactions ADD COLUMN visible_at timestamptz NOT NULL DEFAULT now();
        ALTER TABLE npci_transactions ADD COLUMN original_txn_id text;
        """,
    ),
    Migration(
        "payments.0004_refunds_webhooks_limits",
        """
        CREATE INDEX payments_by_payer_day ON payments (payer_vpa, created_at);
        CREATE TABLE refunds (
            refund_id      text PRIMARY KEY,
            transaction_id text NOT NULL REFERENCES payments,
            merchant_id    text NOT NULL,
            amount_paise   bigint NOT NULL CHECK (amount_paise > 0),
            status         text NOT NULL CHECK (status IN ('PENDING', 'SUCCESS', 'FAILED')),
            response_code  text,
            rrn            text,
            reason         text,
            created_at     timestamptz NOT NULL,
            completed_at   timestamptz
        );
        CREATE INDEX refunds_by_payment ON refunds (transaction_id);
        -- Webhook deliveries: the retry schedule lives here, so it survives restarts.
        CREATE TABLE webhook_deliveries (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id        uuid NOT NULL UNIQUE,
            merchant_id     text NOT NULL,
            transaction_id  text NOT NULL,
            url             text NOT NULL,
            body            bytea NOT NULL,
            status          text NOT NULL CHECK (status IN ('PENDING', 'DELIVERED', 'DEAD')),
            attempts        int NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL,
            last_error      text,
            created_at      timestamptz NOT NULL,
            delivered_at    timestamptz
        );
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
            WHERE status = 'PENDING';
        """,
    ),
    Migration(
        "payments.0005_payment_mcc",
        """
        -- The merchant's category at the time of the payment (settlement prices by it).
        ALTER TABLE payments ADD COLUMN mcc text NOT NULL DEFAULT '0000';
        """,
    ),
    Migration(
        "payments.0006_verifications",
        """
        -- Step-up verifications (fraud STEP_UP): the window, wrong tries, and when verified.
        CREATE TABLE payment_verifications (
            transaction_id text PRIMARY KEY REFERENCES payments (transaction_id),
            expires_at     timestamptz NOT NULL,
            verified_at    timestamptz,
            attempts       int NOT NULL DEFAULT 0
        );
        CREATE INDEX payment_verifications_open ON payment_verifications (expires_at)
            WHERE verified_at IS NULL;
        """,
    ),
    Migration(
        "payments.0007_worker_scan_indexes",
        """
        -- The background workers poll every second or so; without these their scans read
        -- the whole payments table each time (payments/npci_handler.py STALE_SUBMISSIONS,
        -- payments/verification.py EXPIRED_VERIFICATIONS).
        CREATE INDEX payments_submitted_since ON payments (updated_at)
            WHERE status = 'SUBMITTED';
        CREATE INDEX payments_pending_verification ON payments (transaction_id)
            WHERE status = 'PENDING_VERIFICATION';
        """,
    ),
]

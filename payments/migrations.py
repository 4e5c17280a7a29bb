"""Tables of the payments context (gateway, NPCI handler).

Until payments.0014 the mock NPCI switch's tables (``npci_*``) were created here too; that
step hands them over to the simulator, whose tables are its own, in the schema ``npci_sim``
(:mod:`npcisim.migrations`). The earlier steps stay as they ran: history is not rewritten.
"""

from core.outbox import OUTBOX_WRITE_LOCK
from core.storage import Migration
from payments.npci.handover import SIMULATOR_TABLES_HANDOVER

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
    Migration(
        "payments.0008_merchant_vpas",
        f"""
        -- The VPAs a merchant collects into (SPEC §4 payee_vpa): its own, and those added by
        -- `merchant add-vpa`. One VPA belongs to one merchant (the primary key). VPAs are
        -- stored lower-cased, as core.pii.Vpa spells them.
        CREATE TABLE merchant_vpas (
            vpa         text PRIMARY KEY,
            merchant_id text NOT NULL REFERENCES merchants,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX merchant_vpas_by_merchant ON merchant_vpas (merchant_id);
        -- Existing merchants keep their own VPA. Where two merchants shared one, the first
        -- to take it keeps it: the others' payments are then refused for an explicit
        -- payee_vpa, and withheld at settlement, until an operator sorts it out.
        INSERT INTO merchant_vpas (vpa, merchant_id, created_at)
        SELECT DISTINCT ON (lower(vpa)) lower(vpa), merchant_id, created_at FROM merchants
        ORDER BY lower(vpa), created_at, merchant_id;
        -- ... and each of them is published as MerchantVpaRegistered v1 (core/events.py), as
        -- payments/merchants.py register_vpa does, so that settlement's copy of the
        -- registrations has them too. The envelope is core.events.Envelope.to_dict's; the
        -- outbox write lock keeps outbox ids in commit order (core/outbox.py).
        SELECT pg_advisory_xact_lock({OUTBOX_WRITE_LOCK});
        INSERT INTO outbox (event_id, topic, partition_key, event_type, envelope)
        SELECT event_id, 'payments', partition_key, 'MerchantVpaRegistered',
               convert_to(jsonb_build_object(
                   'event_id', event_id::text,
                   'event_type', 'MerchantVpaRegistered',
                   'version', 1,
                   'occurred_at', to_jsonb(now()),
                   'topic', 'payments',
                   'partition_key', partition_key,
                   'transaction_id', NULL,
                   'causation_id', NULL,
                   'payload', jsonb_build_object(
                       'merchant_id', merchant_id,
                       'vpa', vpa,
                       'registered_at', to_jsonb(created_at)
                   )
               )::text, 'UTF8')
        FROM (
            SELECT gen_random_uuid() AS event_id, 'merchant:' || merchant_id AS partition_key,
                   merchant_id, vpa, created_at
            FROM merchant_vpas ORDER BY created_at, vpa
        ) AS registered
        ORDER BY created_at, vpa;
        """,
    ),
    Migration(
        "payments.0009_npci_api_calls",
        """
        -- The mock switch's journal of calls per transaction: every check-status (answered
        -- or refused under NPCI's rule, payments/npci/rules.py) and every reversal. It
        -- enforces the check-status budget from it, and tests read the timeline back.
        CREATE TABLE npci_api_calls (
            id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            txn_id    text NOT NULL,
            api       text NOT NULL,
            called_at timestamptz NOT NULL,
            outcome   text NOT NULL
        );
        CREATE INDEX npci_api_calls_by_txn ON npci_api_calls (txn_id, api, called_at);
        """,
    ),
    Migration(
        "payments.0010_refund_reason",
        """
        -- Why the merchant refunded (SPEC §4), and its note, as the request gave them. The
        -- column reason stays what it was: why a refund failed at the switch.
        ALTER TABLE refunds ADD COLUMN refund_reason text
            CHECK (refund_reason IN ('customer_request', 'duplicate', 'fraudulent', 'other'));
        ALTER TABLE refunds ADD COLUMN note text;
        """,
    ),
    Migration(
        "payments.0011_disputes",
        """
        -- Payers' complaints (payments/disputes.py): what the switch raised and what became
        -- of it. answer_sent: the merchant's (or the automatic) answer reached the switch.
        CREATE TABLE disputes (
            dispute_id     text PRIMARY KEY,
            transaction_id text NOT NULL REFERENCES payments (transaction_id),
            merchant_id    text NOT NULL,
            amount_paise   bigint NOT NULL CHECK (amount_paise > 0),
            reason         text NOT NULL,
            status         text NOT NULL
                CHECK (status IN ('OPEN', 'ACCEPTED', 'CONTESTED', 'WON', 'LOST')),
            raised_at      timestamptz NOT NULL,
            respond_by     timestamptz NOT NULL,
            auto_accepted  boolean NOT NULL DEFAULT false,
            evidence_enc   bytea,
            documents      text[],
            answered_at    timestamptz,
            resolved_at    timestamptz,
            answer_sent    boolean NOT NULL DEFAULT true,
            payer_bank     text NOT NULL,
            payee_bank     text NOT NULL,
            created_at     timestamptz NOT NULL,
            updated_at     timestamptz NOT NULL
        );
        CREATE INDEX disputes_by_merchant ON disputes (merchant_id, raised_at DESC, dispute_id);
        CREATE INDEX disputes_by_payment ON disputes (transaction_id);
        CREATE INDEX disputes_open ON disputes (respond_by) WHERE status = 'OPEN';
        CREATE INDEX disputes_unsent ON disputes (answered_at) WHERE NOT answer_sent;
        -- How far the switch's dispute feed has been read.
        CREATE TABLE dispute_feed (
            id         int PRIMARY KEY CHECK (id = 1),
            seen_until timestamptz NOT NULL
        );
        -- The mock switch's dispute desk (payments/npci/mock_disputes.py).
        CREATE TABLE npci_disputes (
            dispute_id   text PRIMARY KEY,
            txn_id       text NOT NULL UNIQUE,
            payer_vpa    text NOT NULL,
            payee_vpa    text NOT NULL,
            payer_bank   text NOT NULL,
            payee_bank   text NOT NULL,
            amount_paise bigint NOT NULL CHECK (amount_paise > 0),
            reason       text NOT NULL,
            raised_at    timestamptz NOT NULL,
            respond_by   timestamptz NOT NULL,
            status       text NOT NULL,
            evidence     text,
            documents    text[],
            decided_at   timestamptz,
            changed_at   timestamptz NOT NULL
        );
        CREATE INDEX npci_disputes_changed ON npci_disputes (changed_at);
        CREATE INDEX npci_disputes_by_payer ON npci_disputes (payer_vpa, raised_at);
        CREATE INDEX npci_disputes_due ON npci_disputes (status)
            WHERE status IN ('OPEN', 'CONTESTED');
        """,
    ),
    Migration(
        "payments.0012_npci_late_success",
        """
        -- Mock switch: a late success (payments/npci/mock.py). The payer's bank debited, but
        -- the switch answered U30 and shows the debit only from late_at: check-status, the
        -- journal and its settlement data count it from then. NULL: nothing comes late.
        ALTER TABLE npci_transactions ADD COLUMN late_at timestamptz;
        """,
    ),
    Migration(
        "payments.0013_late_success_returns",
        """
        -- Late successes the engine gives back (payments/late_success.py): a payment it
        -- failed that the switch's settlement data shows debited. One row per payment (so a
        -- debit is returned once), written before the reversal is sent; PENDING until the
        -- switch answers, retried at next_attempt_at. The payment's own status stays FAILED.
        CREATE TABLE late_success_returns (
            transaction_id  text PRIMARY KEY REFERENCES payments (transaction_id),
            amount_paise    bigint NOT NULL CHECK (amount_paise > 0),
            found_on        date NOT NULL,
            status          text NOT NULL
                CHECK (status IN ('PENDING', 'RETURNED', 'NOT_DEBITED')),
            response_code   text,
            attempts        int NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL,
            created_at      timestamptz NOT NULL,
            completed_at    timestamptz
        );
        CREATE INDEX late_success_returns_due ON late_success_returns (next_attempt_at)
            WHERE status = 'PENDING';
        """,
    ),
    Migration(
        "payments.0014_simulator_tables_leave",
        """
        -- The mock switch's tables leave the payments context (issue 15): the simulator is
        -- the outside world, with its own tables in the schema npci_sim, created by its own
        -- migrations (npcisim/migrations.py) only where it runs. A table holding rows (an
        -- engine that ran with the mock: its balances, journal and disputes) moves there,
        -- renamed without its npci_ prefix, with its indexes, constraints and identity
        -- sequence. An empty one (a fresh database, where 0002 etc. just made it) is
        -- dropped: with a real NPCI none of the simulator's tables exists.
        """
        + SIMULATOR_TABLES_HANDOVER
        + """
        """,
    ),
    Migration(
        "payments.0015_webhook_secrets",
        """
        -- Webhook secrets, several per merchant (payments/merchants.py): a rotation adds one
        -- and gives the others an expiry; webhooks are signed with every one not expired.
        -- merchants.webhook_secret_enc stays as the first secret, copied here.
        CREATE TABLE webhook_secrets (
            secret_id   text PRIMARY KEY,
            merchant_id text NOT NULL REFERENCES merchants (merchant_id),
            secret_enc  bytea NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz
        );
        CREATE INDEX webhook_secrets_by_merchant ON webhook_secrets (merchant_id, created_at);
        INSERT INTO webhook_secrets (secret_id, merchant_id, secret_enc, created_at)
        SELECT 'whs_' || substr(md5(merchant_id), 1, 20), merchant_id, webhook_secret_enc,
               created_at
        FROM merchants;
        """,
    ),
    Migration(
        "payments.0016_partition_keys",
        """
        -- The bus partition key of a payment's events, fixed at initiation: the payer's
        -- keyed pseudonym (core.crypto.MasterKey.partition_key). Payments made before keep
        -- the unkeyed hash they were published under (core.pii.unkeyed_partition_key), so
        -- one payer's events stay on one partition, in order, across the upgrade.
        ALTER TABLE payments ADD COLUMN partition_key text;
        UPDATE payments
           SET partition_key
               = left(encode(sha256(convert_to(lower(payer_vpa), 'UTF8')), 'hex'), 32);
        ALTER TABLE payments ALTER COLUMN partition_key SET NOT NULL;
        """,
    ),
    Migration(
        "payments.0017_sealed_payers",
        """
        -- The payer's PII leaves the payments table's clear columns (SPEC §1): the VPA and
        -- the device (with its IP and location) are sealed together in payer_pii under
        -- the PII field key (core/crypto.py MasterKey.seal_pii), and the payer's day is
        -- found by payer_key, the VPA's keyed pseudonym. SQL has no key: rows written
        -- before this step are sealed by the first engine that starts after it
        -- (payments/retention.py seal_clear_payers), which then empties payer_vpa and
        -- device. The retention purge (same module) empties payer_pii.
        ALTER TABLE payments ADD COLUMN payer_key bytea;
        ALTER TABLE payments ADD COLUMN payer_pii bytea;
        ALTER TABLE payments ADD COLUMN pii_purged_at timestamptz;
        ALTER TABLE payments ALTER COLUMN payer_vpa DROP NOT NULL;
        DROP INDEX payments_by_payer_day;
        CREATE INDEX payments_by_payer_day ON payments (payer_key, created_at);
        CREATE INDEX payments_with_clear_payer ON payments (transaction_id)
            WHERE payer_vpa IS NOT NULL;
        """,
    ),
]

"""Tables of the settlement context."""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "settlement.0001_items_runs",
        """
        -- Settled movements as final-status events reported them. cycle_date is the
        -- business date whose settlement carries the item: its own, or the next open one
        -- when it arrived after its date was closed (note says so).
        CREATE TABLE settlement_items (
            event_id       uuid PRIMARY KEY,
            kind           text NOT NULL CHECK (kind IN ('PAYMENT', 'REFUND')),
            reference      text NOT NULL UNIQUE,
            transaction_id text NOT NULL,
            merchant_id    text NOT NULL,
            mcc            text NOT NULL,
            amount_paise   bigint NOT NULL CHECK (amount_paise > 0),
            payer_bank     text NOT NULL,
            payee_bank     text NOT NULL,
            final_at       timestamptz NOT NULL,
            business_date  date NOT NULL,
            cycle_date     date NOT NULL,
            note           text
        );
        CREATE INDEX settlement_items_by_cycle ON settlement_items (cycle_date);
        -- Payments that ended FAILED/BLOCKED (a switch debit for them is a mismatch) and
        -- payments deemed and not yet resolved.
        CREATE TABLE settlement_other (
            reference     text PRIMARY KEY,
            status        text NOT NULL,
            amount_paise  bigint,
            business_date date NOT NULL,
            updated_at    timestamptz NOT NULL
        );
        CREATE TABLE settlement_runs (
            business_date   date PRIMARY KEY,
            settlement_date date NOT NULL,
            closed_at       timestamptz NOT NULL,
            summary         jsonb NOT NULL,
            files           jsonb NOT NULL
        );
        """,
    ),
    Migration(
        "settlement.0002_merchant_vpas",
        """
        -- Settlement's own copy of the merchants' collection VPAs, from MerchantVpaRegistered
        -- events: a payment is credited to its merchant only if its payee is one of them.
        -- VPAs are kept as keyed pseudonyms (core.crypto.MasterKey.pseudonym), never in clear.
        CREATE TABLE settlement_merchant_vpas (
            vpa_key       bytea PRIMARY KEY,
            merchant_id   text NOT NULL,
            registered_at timestamptz NOT NULL
        );
        -- The payee of a payment item, as the same pseudonym. NULL for refunds, and for
        -- payments recorded before payees were (they are not checked).
        ALTER TABLE settlement_items ADD COLUMN payee_key bytea;
        """,
    ),
    Migration(
        "settlement.0003_tat",
        """
        -- The day a payment was sent to the switch (T of RBI's turn-around time), kept from
        -- its first event: a deemed payment is due to be reversed by T + 5 (P2M).
        ALTER TABLE settlement_other ADD COLUMN transaction_date date;
        CREATE INDEX settlement_other_unresolved ON settlement_other (transaction_date)
            WHERE status IN ('PENDING', 'DEEMED');
        """,
    ),
    Migration(
        "settlement.0004_chargebacks",
        """
        -- Chargebacks (accepted or lost disputes) are items too: reference = the dispute id.
        ALTER TABLE settlement_items DROP CONSTRAINT settlement_items_kind_check;
        ALTER TABLE settlement_items ADD CONSTRAINT settlement_items_kind_check
            CHECK (kind IN ('PAYMENT', 'REFUND', 'CHARGEBACK'));
        """,
    ),
]

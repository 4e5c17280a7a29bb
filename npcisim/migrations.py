"""The switch simulator's own tables, in the PostgreSQL schema ``npci_sim``.

Run only where the simulator runs: the in-process mock (``UPI_NPCI_URL`` unset) and the
``upi-engine npci-mock`` process. In a real deployment these would be NPCI's and the banks'
systems: with a real switch none of them exists. Their history before the simulator had
its own schema is payments.0002, 0003, 0009, 0011 and 0012, handed over by payments.0014.
"""

from core.storage import Migration
from payments.npci.handover import SIMULATOR_TABLES_HANDOVER

MIGRATIONS = [
    Migration(
        "npcisim.0001_own_schema",
        """
        CREATE SCHEMA IF NOT EXISTS npci_sim;
        -- A database laid out the old way whose engine has not run payments.0014 yet (an
        -- npci-mock upgraded first, on the engine's database): the same handover.
        """
        + SIMULATOR_TABLES_HANDOVER
        + """
        -- Accounts at the banks behind the switch, opened on first use.
        CREATE TABLE IF NOT EXISTS npci_sim.accounts (
            vpa           text PRIMARY KEY,
            bank          text NOT NULL,
            balance_paise bigint NOT NULL CHECK (balance_paise >= 0)
        );
        -- The switch's own journal: one row per transaction it saw, keyed by our txn id,
        -- so a repeated pay request can never debit twice. An answer stays pending
        -- (check-status 01) until visible_at; refunds point at the payment they credit back;
        -- a late success shows its debit only from late_at (NULL: nothing comes late).
        CREATE TABLE IF NOT EXISTS npci_sim.transactions (
            txn_id          text PRIMARY KEY,
            kind            text NOT NULL,
            payer_vpa       text NOT NULL,
            payee_vpa       text NOT NULL,
            payer_bank      text NOT NULL,
            payee_bank      text NOT NULL,
            amount_paise    bigint NOT NULL CHECK (amount_paise > 0),
            status          text NOT NULL,
            response_code   text NOT NULL,
            rrn             text NOT NULL,
            debited         boolean NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            visible_at      timestamptz NOT NULL DEFAULT now(),
            original_txn_id text,
            late_at         timestamptz
        );
        -- The journal of calls per transaction: every check-status (answered or refused
        -- under NPCI's rule) and every reversal.
        CREATE TABLE IF NOT EXISTS npci_sim.api_calls (
            id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            txn_id    text NOT NULL,
            api       text NOT NULL,
            called_at timestamptz NOT NULL,
            outcome   text NOT NULL
        );
        CREATE INDEX IF NOT EXISTS api_calls_by_txn ON npci_sim.api_calls (txn_id, api, called_at);
        -- The dispute desk (npcisim/disputes.py).
        CREATE TABLE IF NOT EXISTS npci_sim.disputes (
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
        CREATE INDEX IF NOT EXISTS disputes_changed ON npci_sim.disputes (changed_at);
        CREATE INDEX IF NOT EXISTS disputes_by_payer ON npci_sim.disputes (payer_vpa, raised_at);
        CREATE INDEX IF NOT EXISTS disputes_due ON npci_sim.disputes (status)
            WHERE status IN ('OPEN', 'CONTESTED');
        """,
    ),
]

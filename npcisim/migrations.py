"""The switch simulator's own tables, in the PostgreSQL schema ``npci_sim``.

Run only where the simulator runs: the in-process mock (``UPI_NPCI_URL`` unset) and the
``upi-engine npci-mock`` process. In a real deployment these would be NPCI's and the banks'
systems: with a real switch none of them exists. Their history before the simulator had
its own schema is payments.0002, 0003, 0009, 0011 and 0012, handed over by payments.0014.
"""

from core.storage import Migration

MIGRATIONS = [
    Migration(
        "npcisim.0001_own_schema",
        """
        CREATE SCHEMA IF NOT EXISTS npci_sim;
        -- A database laid out the old way whose engine has not run payments.0014 yet (an
        -- npci-mock upgraded first, on the engine's database): the same handover.
        DO $handover$
        DECLARE
            t record;
            r record;
            has_rows boolean;
            moved regclass;
        BEGIN
            FOR t IN SELECT * FROM (VALUES ('npci_accounts', 'accounts'),
                ('npci_transactions', 'transactions'), ('npci_api_calls', 'api_calls'),
                ('npci_disputes', 'disputes')) AS v (old, new)
            LOOP
                CONTINUE WHEN to_regclass(format('public.%I', t.old)) IS NULL;
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I)', t.old) INTO has_rows;
                IF NOT has_rows THEN
                    EXECUTE format('DROP TABLE public.%I', t.old);
                    CONTINUE;
                END IF;
                IF to_regclass(format('npci_sim.%I', t.new)) IS NOT NULL THEN
                    RAISE EXCEPTION 'public.% holds rows and npci_sim.% exists already', t.old,
                        t.new USING HINT = 'move the rows by hand, then drop public.' || t.old;
                END IF;
                CREATE SCHEMA IF NOT EXISTS npci_sim;
                EXECUTE format('ALTER TABLE public.%I SET SCHEMA npci_sim', t.old);
                EXECUTE format('ALTER TABLE npci_sim.%I RENAME TO %I', t.old, t.new);
                moved := format('npci_sim.%I', t.new)::regclass;
                -- Names as the simulator's own CREATE gives them: without the npci_ prefix.
                FOR r IN SELECT conname FROM pg_constraint
                    WHERE conrelid = moved AND left(conname, 5) = 'npci_'
                LOOP
                    EXECUTE format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', moved,
                        r.conname, substr(r.conname, 6));
                END LOOP;
                FOR r IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                    WHERE i.indrelid = moved AND left(c.relname, 5) = 'npci_'
                LOOP
                    EXECUTE format('ALTER INDEX npci_sim.%I RENAME TO %I', r.relname,
                        substr(r.relname, 6));
                END LOOP;
                FOR r IN SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
                    WHERE d.refobjid = moved AND s.relkind = 'S' AND left(s.relname, 5) = 'npci_'
                LOOP
                    EXECUTE format('ALTER SEQUENCE npci_sim.%I RENAME TO %I', r.relname,
                        substr(r.relname, 6));
                END LOOP;
            END LOOP;
        END
        $handover$;
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

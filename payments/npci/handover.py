"""The SQL that moves the switch simulator's tables out of the engine's schema.

The simulator's tables once lived in ``public`` with an ``npci_`` prefix (payments.0002,
0003, 0009, 0011, 0012). They now live in the schema ``npci_sim`` (npcisim/migrations.py).
Two migrations run this same block, whichever comes first on a database laid out the
old way: payments.0014 (the engine upgraded first) and npcisim.0001 (an ``npci-mock``
upgraded first). A table that holds rows moves, renamed without its prefix, with its
constraints, indexes and identity sequence. An empty one is dropped.
"""

__all__ = ["SIMULATOR_TABLES_HANDOVER"]

SIMULATOR_TABLES_HANDOVER = """\
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
"""

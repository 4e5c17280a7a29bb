"""The shared kernel: envelope and event contracts, money and ids, clock, config, bus
backends, storage (engine, migrations, outbox, inbox). Contexts import it; it imports none."""

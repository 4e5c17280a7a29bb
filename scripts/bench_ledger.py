"""Ledger throughput on this machine: append rate (entries/s, through PostgreSQL, in
batches as the ledger consumer writes them) and verify rate (MB/s of entries checked,
from the database, and in memory over an export).

    .venv/bin/python scripts/bench_ledger.py [--entries 50000] [--batch 1000]

Starts its own embedded PostgreSQL in a temporary directory and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson

from api.bootstrap import all_migrations
from compliance import chain, keys
from compliance.ledger import LedgerWriter, export_lines, verify_ledger
from core.clock import SystemClock
from core.crypto import MasterKey
from core.embedded import embedded_database_url, scratch_data_dir
from core.events import Envelope, PaymentSucceeded
from core.storage import Database, migrate


def envelopes(n: int) -> list[Envelope]:
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        event = PaymentSucceeded(
            transaction_id=f"UPI{i:032d}",
            merchant_id="mer_bench",
            amount_paise=1_000 + i,
            response_code="00",
            rrn=f"{i:012d}",
            completed_at=now,
            payer_vpa=f"payer{i % 5000}@okhdfc",
            payee_vpa="shop@okicici",
            payer_bank="HDFC",
            payee_bank="ICICI",
            merchant_mcc="5411",
        )
        out.append(Envelope.wrap(event, partition_key=f"k{i % 64}", occurred_at=now))
    return out


async def run(entries: int, batch: int, data_dir: Path) -> dict[str, object]:
    db = Database(embedded_database_url(data_dir), pool_size=4)
    await migrate(db, all_migrations())
    writer = LedgerWriter(db, MasterKey(os.urandom(32)), SystemClock())
    events = envelopes(entries)
    await writer.append(events[:10])  # keys made, caches warm
    start = time.perf_counter()
    for i in range(10, entries, batch):
        await writer.append(events[i : i + batch])
    append_s = time.perf_counter() - start
    await writer.checkpoint_if_due(force=True)
    # The verifications run as `ledger verify` would, in a process that does not hold 50,000
    # envelopes (or, below, the export's lines) for the garbage collector to walk.
    del events
    gc.collect()

    db_verify_s = statistics.median([await _verify_from_db(db, entries) for _ in range(3)])
    lines = [line async for line in export_lines(db)]
    size = sum(len(orjson.dumps(line)) for line in lines)
    gc.freeze()
    async with db.connection() as conn:
        public = await keys.public_keys(conn)
        stored = (
            await conn.exec_driver_sql(
                "SELECT sum(octet_length(ciphertext) + octet_length(nonce) + 64"
                " + octet_length(event_type) + octet_length(transaction_id)"
                " + octet_length(recorded_at) + octet_length(key_id) + 16) FROM ledger_entries"
            )
        ).scalar_one()
    mem_verify_s = statistics.median(
        _timed(lambda: chain.verify_lines(lines, public).valid) for _ in range(3)
    )
    mb = int(stored) / 1e6
    baselines = await _baselines(db, entries, mb)
    await db.close()
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": datetime.now(UTC).date().isoformat(),
        "entries": entries,
        "batch": batch,
        "appends_per_second": round((entries - 10) / append_s),
        "stored_mb": round(mb, 1),
        "verify_from_db_mb_per_s": round(mb / db_verify_s, 1),
        "verify_from_db_entries_per_s": round(entries / db_verify_s),
        "verify_export_in_memory_mb_per_s": round(size / 1e6 / mem_verify_s, 1),
        **baselines,
        "appends_vs_bare_copy": round(
            (entries - 10) / append_s / baselines["baseline_bare_copy_rows_per_s"], 3
        ),
        "db_verify_vs_bare_read": round(
            mb / db_verify_s / baselines["baseline_bare_read_mb_per_s"], 3
        ),
        "export_verify_vs_python_sha256": round(
            size / 1e6 / mem_verify_s / baselines["baseline_python_sha256_mb_per_s"], 3
        ),
    }


def _timed(check: Callable[[], bool]) -> float:
    start = time.perf_counter()
    assert check()
    return time.perf_counter() - start


async def _verify_from_db(db: Database, entries: int) -> float:
    start = time.perf_counter()
    result = await verify_ledger(db, SystemClock(), full=True)
    assert result.valid and result.entries == entries, result
    return time.perf_counter() - start


async def _baselines(db: Database, entries: int, mb: float) -> dict[str, float]:
    """The machine's own speed, measured in the same run: a bare COPY of rows as wide as
    ledger entries into a table with no index (the floor of any append), reading the
    stored entries as binary COPY in height order without checking anything (the floor of
    verifying from the database), and Python's hashlib over the stored ciphertexts."""
    async with db.connection() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(
            "CREATE TEMP TABLE bare (height bigint, event_id uuid, payload bytea, h bytea)"
        )
        rows = [(i, uuid.uuid4(), os.urandom(800), os.urandom(32)) for i in range(entries)]
        start = time.perf_counter()
        for i in range(0, entries, 1000):
            await raw.copy_records_to_table("bare", records=rows[i : i + 1000])
        copy_s = time.perf_counter() - start

        async def drop(_chunk: bytes) -> None:
            return None

        reads = []
        for _ in range(3):
            start = time.perf_counter()
            await raw.copy_from_query(
                "SELECT * FROM ledger_entries ORDER BY height", output=drop, format="binary"
            )
            reads.append(time.perf_counter() - start)
        size = await raw.fetchval("SELECT sum(octet_length(ciphertext)) FROM ledger_entries")
        blobs = [r[0] for r in await raw.fetch("SELECT ciphertext FROM ledger_entries")]
    start = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).digest()
    py_s = time.perf_counter() - start
    return {
        "baseline_bare_copy_rows_per_s": round(entries / copy_s),
        "baseline_bare_read_mb_per_s": round(mb / statistics.median(reads), 1),
        "baseline_python_sha256_mb_per_s": round(int(size) / 1e6 / py_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1_000)
    args = parser.parse_args()
    with scratch_data_dir("ulb") as data_dir:
        print(
            orjson.dumps(
                asyncio.run(run(args.entries, args.batch, data_dir)), option=orjson.OPT_INDENT_2
            ).decode()
        )


if __name__ == "__main__":
    main()

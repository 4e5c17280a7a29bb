"""The auditor's read at ledger scale (issue 16): ``GET /v1/audit/transactions/{id}``'s work
(``compliance.ledger.transaction_audit``: the transaction's entries decrypted, each with its
inclusion proof in the latest checkpoint's tree) at 1M and at 10M entries, against the
previous way of proving inclusion (read every entry hash up to the checkpoint and build the
proof from them, what the engine did before the stored tree) at 1M, in the same run.

    .venv/bin/python scripts/bench_audit.py [--sizes 1000000 10000000] [--reads 300]

Fills one ledger through the real writer (``LedgerWriter.append``, batches of 2,000; four
events per payment), measuring at each size on the way. Each proof returned is checked
against the signed root (outside the timing). Starts its own embedded PostgreSQL in a
temporary directory and removes it afterwards; 10M entries take about 7 GB and a while.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from api.bootstrap import all_migrations
from compliance import tree, verifier
from compliance.ledger import LedgerWriter, latest_checkpoint, transaction_audit
from core.clock import SystemClock
from core.crypto import MasterKey
from core.embedded import embedded_database_url, scratch_data_dir
from core.events import Envelope, PaymentSucceeded
from core.storage import Database, migrate, sql_text

EVENTS_PER_PAYMENT = 4
BATCH = 2_000


def _txn(payment: int) -> str:
    return f"UPI{payment:032d}"


def _envelopes(first: int, n: int, now: datetime) -> list[Envelope]:
    out = []
    for height in range(first, first + n):
        payment = height // EVENTS_PER_PAYMENT
        event = PaymentSucceeded(
            transaction_id=_txn(payment),
            merchant_id="mer_bench",
            amount_paise=1_000 + payment % 90_000,
            response_code="00",
            rrn=f"{payment % 10**12:012d}",
            completed_at=now,
            payer_vpa=f"payer{payment % 50_000}@okhdfc",
            payee_vpa="shop@okicici",
            payer_bank="HDFC",
            payee_bank="ICICI",
            merchant_mcc="5411",
        )
        out.append(Envelope.wrap(event, partition_key=f"k{payment % 64}", occurred_at=now))
    return out


async def _fill(writer: LedgerWriter, start: int, end: int) -> float:
    now = datetime.now(UTC)
    began = time.perf_counter()
    for first in range(start, end, BATCH):
        await writer.append(_envelopes(first, min(BATCH, end - first), now))
        if (first // BATCH) % 250 == 0:
            print(f"  filled {first:,} entries", file=sys.stderr, flush=True)
    await writer.checkpoint_if_due(force=True)
    return (end - start) / (time.perf_counter() - began)


def _check(audit: dict, root: bytes) -> None:
    for item in audit["events"]:
        p = item["inclusion_proof"]
        assert item["event"] is not None
        assert verifier.verify_inclusion(
            p["leaf_index"],
            p["tree_size"],
            bytes.fromhex(item["entry"]["entry_hash"]),
            [bytes.fromhex(h) for h in p["audit_path"]],
            root,
        ), p


def _summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "reads": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
    }


async def _audit_reads(db: Database, master: MasterKey, size: int, reads: int) -> dict:
    checkpoint = await latest_checkpoint(db)
    assert checkpoint is not None and checkpoint.height == size
    rng = random.Random(size)
    samples = []
    for _ in range(reads):
        txn = _txn(rng.randrange(size // EVENTS_PER_PAYMENT))
        began = time.perf_counter()
        audit = await transaction_audit(db, master, txn)
        samples.append(time.perf_counter() - began)
        assert len(audit["events"]) == EVENTS_PER_PAYMENT
        _check(audit, checkpoint.merkle_root)
    return _summary(samples)


async def _previous_way(db: Database, size: int, reads: int) -> dict:
    """Before the stored tree: one transaction's proof read every entry hash below the
    checkpoint and built the RFC 6962 path from them (its rows then decrypted as now)."""
    checkpoint = await latest_checkpoint(db)
    assert checkpoint is not None
    rng = random.Random(-size)
    samples = []
    for _ in range(reads):
        payment = rng.randrange(size // EVENTS_PER_PAYMENT)
        began = time.perf_counter()
        async with db.connection() as conn:
            heights = (
                await conn.execute(
                    sql_text("SELECT height FROM ledger_entries WHERE transaction_id = :t"),
                    {"t": _txn(payment)},
                )
            ).scalars()
            hashes = [
                bytes(h)
                for h in (
                    await conn.execute(
                        sql_text(
                            "SELECT entry_hash FROM ledger_entries WHERE height < :n"
                            " ORDER BY height"
                        ),
                        {"n": checkpoint.height},
                    )
                ).scalars()
            ]
        proofs = [tree.reference_inclusion_proof(int(h), hashes) for h in heights]
        samples.append(time.perf_counter() - began)
        assert len(proofs) == EVENTS_PER_PAYMENT
    return _summary(samples)


async def run(sizes: list[int], reads: int, baseline_reads: int, data_dir: Path) -> dict:
    db = Database(embedded_database_url(data_dir), pool_size=4)
    await migrate(db, all_migrations())
    master = MasterKey(os.urandom(32))
    writer = LedgerWriter(db, master, SystemClock())
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": datetime.now(UTC).date().isoformat(),
    }
    filled = 0
    for size in sorted(sizes):
        rate = await _fill(writer, filled, size)
        filled = size
        print(f"  measuring at {size:,}", file=sys.stderr, flush=True)
        at: dict[str, object] = {"fill_appends_per_second": round(rate)}
        at["audit_read"] = await _audit_reads(db, master, size, reads)
        if size == min(sizes):
            at["previous_way"] = await _previous_way(db, size, baseline_reads)
        async with db.connection() as conn:
            at["database_gb"] = round(
                int(
                    (
                        await conn.execute(sql_text("SELECT pg_database_size(current_database())"))
                    ).scalar_one()
                )
                / 1e9,
                2,
            )
        results[f"{size:,}"] = at
    await db.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--baseline-reads", type=int, default=20)
    args = parser.parse_args()
    with scratch_data_dir("uba") as data_dir:
        result = asyncio.run(run(args.sizes, args.reads, args.baseline_reads, data_dir))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()

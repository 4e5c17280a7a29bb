"""Time to score one payment with all four fraud scorers, at p50 and p99, on this machine.

    .venv/bin/python scripts/bench_fraud.py [--payments 5000]

Measures, over simulated traffic (every typology), one payment at a time:

* ``score``: the four scorers run concurrently within their budgets and combined
  (``FraudEngine.assess``), history given;
* ``assess``: what the fraud consumer does per payment: read the history from PostgreSQL,
  score, record the payment, commit (without the outbox write);
* baselines in the same run: scikit-learn's own ``predict_proba`` on the same single rows
  (which the model scorer replaces by the compiled trees), and a bare ``SELECT 1``.

Starts its own embedded PostgreSQL in a temporary directory and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from sqlalchemy import text

from api.bootstrap import all_migrations
from core.config import Settings
from core.crypto import MasterKey
from core.embedded import embedded_database_url, scratch_data_dir
from core.storage import Database, migrate
from fraud.assessor import build_engine
from fraud.features import feature_vector
from fraud.history import HistoryTracker
from fraud.model import load_model
from fraud.simulator import simulate
from fraud.store import HistoryStore


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": pct(samples, 0.50),
        "p99_ms": pct(samples, 0.99),
        "mean_ms": round(statistics.fmean(samples) * 1000, 3),
    }


async def run(payments: int, data_dir: Path) -> dict[str, object]:
    engine, version = build_engine(Settings())
    traffic = [t.txn for t in simulate(99, payers=1_500, days=1.0, scale=0.3)][:payments]
    tracker = HistoryTracker()
    score: list[float] = []
    skipped = 0
    model_alone: list[float] = []
    estimator = load_model().estimator
    for txn in traffic:
        history = tracker.history(txn)
        started = time.perf_counter()
        assessment = await engine.assess(txn, history)
        score.append(time.perf_counter() - started)
        skipped += len(assessment.skipped)
        vector = feature_vector(txn, history)
        started = time.perf_counter()
        estimator.predict_proba([vector])
        model_alone.append(time.perf_counter() - started)
        tracker.observe(txn)

    db = Database(embedded_database_url(data_dir), pool_size=4)
    await migrate(db, all_migrations())
    store = HistoryStore(MasterKey(os.urandom(32)))
    assess: list[float] = []
    select_one: list[float] = []
    for n, txn in enumerate(traffic):
        started = time.perf_counter()
        async with db.transaction() as conn:
            history = await store.history(conn, txn)
            await engine.assess(txn, history)
            await store.observe(conn, f"B{n}", txn)
        assess.append(time.perf_counter() - started)
        started = time.perf_counter()
        async with db.connection() as conn:
            await conn.execute(text("SELECT 1"))
        select_one.append(time.perf_counter() - started)
    await db.close()
    engine.close()
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": datetime.now(UTC).date().isoformat(),
        "model_version": version,
        "payments": len(traffic),
        "score_all_four": summary(score),
        "assess_with_history_from_postgresql": summary(assess),
        "skipped_scorers": skipped,
        "baseline_sklearn_predict_proba_one_row": summary(model_alone),
        "baseline_select_1": summary(select_one),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--payments", type=int, default=5_000)
    args = parser.parse_args()
    with scratch_data_dir("ufb") as data_dir:
        result = asyncio.run(run(args.payments, data_dir))
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()

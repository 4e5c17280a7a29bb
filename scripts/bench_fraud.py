"""Time to score one payment with all four fraud scorers, at p50 and p99, on this machine.

    .venv/bin/python scripts/bench_fraud.py [--payments 5000] [--baseline 02a4a0e]

Measures, over simulated traffic (every typology), one payment at a time:

* ``score``: the four scorers run concurrently within their budgets and combined
  (``FraudEngine.assess``), history given;
* ``assess``: what the fraud consumer does per payment: read the history from PostgreSQL,
  score, record the payment, commit (without the outbox write);
* ``batch_scoring``: the consumer's own path, batches of 50: the payee windows, then per
  round the histories and the scorers (what ``upi_fraud_scoring_seconds`` observes for
  each payment of the batch), per batch;
* baselines in the same run: scikit-learn's own ``predict_proba`` on the same single rows
  (which the model scorer replaces by the compiled trees), and a bare ``SELECT 1``.

Starts its own embedded PostgreSQL in a temporary directory and removes it afterwards.

``--baseline REV``: also measures the code of git revision ``REV`` in the same run, for
comparison: the revision is exported (``git archive``, into a temporary directory; the
repository is not touched) and this script runs on it (``PYTHONPATH``: the export), with
this environment's packages: the same measurements of the old engine, its simulator, its
model and its tables. Its figures come under ``baseline``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
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
from fraud.store import HistoryStore, split_rounds


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
    batch_scoring: list[float] = []
    for start in range(0, len(traffic), 50):
        batch = traffic[start : start + 50]
        async with db.transaction() as conn:
            started = time.perf_counter()
            keys = [store.pseudonyms(t) for t in batch]
            payee = await store.payee_windows(conn, batch, keys)
            rounds = split_rounds(batch)
            for positions in rounds:
                part = [batch[i] for i in positions]
                part_keys = [keys[i] for i in positions]
                histories = await store.histories(
                    conn, part, [payee[i] for i in positions], part_keys
                )
                await engine.assess_batch(part, histories)
                await store.observe_many(
                    conn, [f"C{start + i}" for i in positions], part, part_keys
                )
            batch_scoring.append(time.perf_counter() - started)
    await db.close()
    engine.close()
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": datetime.now(UTC).date().isoformat(),
        "model_version": version,
        "payments": len(traffic),
        "score_all_four": summary(score),
        "assess_with_history_from_postgresql": summary(assess),
        "batch_scoring_50_per_batch": summary(batch_scoring),
        "skipped_scorers": skipped,
        "baseline_sklearn_predict_proba_one_row": summary(model_alone),
        "baseline_select_1": summary(select_one),
    }


def baseline(revision: str, payments: int) -> dict[str, object]:
    """This benchmark as it was at ``revision``, run on that revision's code."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="ufb-base") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", revision],
            check=True,
            capture_output=True,
        ).stdout
        tar_path = Path(tmp) / "rev.tar"
        tar_path.write_bytes(archive)
        tree = Path(tmp) / "tree"
        with tarfile.open(tar_path) as tar:
            tar.extractall(tree, filter="data")
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--payments", str(payments)],
            check=True,
            capture_output=True,
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
    found: dict[str, object] = orjson.loads(done.stdout)
    return {"revision": revision, **found}


def _p99(run: dict[str, object]) -> float:
    found = run["score_all_four"]
    assert isinstance(found, dict)
    return float(found["p99_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--payments", type=int, default=5_000)
    parser.add_argument("--baseline", help="a git revision to measure in the same run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="baseline and this code alternately, so many times each; the figures are of"
        " each side's run with the lowest scoring p99 (the least disturbed by other load"
        " on a shared machine), every run listed under 'runs'",
    )
    args = parser.parse_args()
    runs: list[dict[str, object]] = []
    baselines: list[dict[str, object]] = []
    for _ in range(args.rounds):
        if args.baseline:
            baselines.append(baseline(args.baseline, args.payments))
        with scratch_data_dir("ufb") as data_dir:
            runs.append(asyncio.run(run(args.payments, data_dir)))
    result = dict(min(runs, key=_p99))
    if baselines:
        result["baseline"] = min(baselines, key=_p99)
    if args.rounds > 1:
        result["runs"] = {
            "score_all_four_p99_ms": [_p99(r) for r in runs],
            "baseline_score_all_four_p99_ms": [_p99(r) for r in baselines],
        }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()

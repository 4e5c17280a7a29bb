"""Scoring a batch: the vectorised model, the engine's batch path and its budget, the
rounds a batch is split into. No database (tests/integration/test_fraud_batch.py has the
consumer)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fraud.engine import FraudEngine
from fraud.features import History, Txn
from fraud.model import ARTIFACTS, TREES_FILE, CompiledTrees, load_model
from fraud.scorers import DeviceScorer, LocationScorer, ModelScorer, Signal, VelocityScorer
from fraud.simulator import featurise, simulate
from fraud.store import split_rounds

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def estimator():
    return load_model().estimator


@pytest.fixture(scope="module")
def traffic():
    """Simulated payments (every typology) with their features and in-memory histories."""
    return list(featurise(simulate(5, payers=200, days=1.0, scale=0.3)))


# --------------------------------------------------------------------------- the model


def test_batch_model_scores_are_predict_ones_bit_for_bit(estimator, traffic):
    compiled = CompiledTrees.of(estimator)
    xs = [vector for _, vector, _ in traffic]
    assert len(xs) > 500
    one = [compiled.predict_one(x) for x in xs]
    many = compiled.predict_many(xs)
    assert max(abs(a - b) for a, b in zip(one, many, strict=True)) < 1e-9
    assert many == one  # same comparisons, same order of additions, same exp
    reference = estimator.predict_proba(xs)[:, 1]
    assert max(abs(a - float(r)) for a, r in zip(many, reference, strict=True)) < 1e-12
    for size in (0, 1, 3, 4, 5, 17):  # both sides of the vectorised path's threshold
        assert compiled.predict_many(xs[:size]) == one[:size]


def test_the_shipped_trees_file_is_the_estimator_compiled(estimator, traffic):
    """What the engine scores with (the trees file) is the shipped estimator, exactly: a
    retrain that left an old trees file behind fails here (and on its SHA-256)."""
    served = load_model().trees
    compiled = CompiledTrees.of(estimator)
    assert served.baseline == compiled.baseline and served.trees == compiled.trees
    xs = [vector for _, vector, _ in traffic]
    assert served.predict_many(xs) == compiled.predict_many(xs)
    assert CompiledTrees.from_json(compiled.to_json()).trees == compiled.trees


def test_a_trees_file_that_is_not_the_one_model_json_names_is_refused(tmp_path):
    shutil.copytree(ARTIFACTS, tmp_path, dirs_exist_ok=True)
    trees = json.loads((tmp_path / TREES_FILE).read_bytes())
    trees["baseline"] += 1.0  # a file someone changed: it would score every payment higher
    (tmp_path / TREES_FILE).write_bytes(json.dumps(trees).encode())
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(tmp_path)


def test_a_model_directory_from_before_the_trees_file_still_loads(tmp_path, estimator):
    shutil.copytree(ARTIFACTS, tmp_path, dirs_exist_ok=True)
    (tmp_path / TREES_FILE).unlink()
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["trees_sha256"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    assert load_model(tmp_path).trees.trees == CompiledTrees.of(estimator).trees


def test_the_engine_scores_without_importing_scikit_learn():
    """The fraud engine an engine builds at start reads the trees file: scikit-learn (and
    scipy) stay unimported, 2.5-3 s of CPU saved at every start."""
    probe = (
        "import sys\n"
        "from core.config import Settings\n"
        "from fraud.assessor import build_engine\n"
        "engine, version = build_engine(Settings())\n"
        "print(version, sorted(m for m in ('sklearn', 'skops', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == [load_model().version, "[]"]


def test_a_row_with_a_missing_feature_takes_the_exact_path(estimator, traffic):
    compiled = CompiledTrees.of(estimator)
    xs = [list(vector) for _, vector, _ in traffic[:50]]
    xs[7][12] = math.nan  # implied speed unknown: the trees' missing-value branches
    many = compiled.predict_many(xs)
    assert many == [compiled.predict_one(x) for x in xs]
    assert many[7] == pytest.approx(float(estimator.predict_proba([xs[7]])[0, 1]), abs=1e-12)


def test_model_scorer_scores_a_batch_as_one_payment_at_a_time(estimator, traffic):
    scorer = ModelScorer(CompiledTrees.of(estimator), "v")
    txns = [item.txn for item, _, _ in traffic]
    histories = [history for _, _, history in traffic]
    assert scorer.score_batch(txns, histories) == [
        scorer.score(t, h) for t, h in zip(txns, histories, strict=True)
    ]


# --------------------------------------------------------------------------- the engine


async def test_engine_batch_equals_one_payment_at_a_time(estimator, traffic):
    scorers = [
        VelocityScorer(),
        LocationScorer(),
        DeviceScorer(),
        ModelScorer(CompiledTrees.of(estimator), "v"),
    ]
    # Budgets no loaded machine overruns: this test is about the numbers.
    engine = FraudEngine(scorers, budgets_s=dict.fromkeys([s.name for s in scorers], 30.0))
    txns = [item.txn for item, _, _ in traffic]
    histories = [history for _, _, history in traffic]
    try:
        batch = await engine.assess_batch(txns, histories)
        single = [await engine.assess(t, h) for t, h in zip(txns, histories, strict=True)]
    finally:
        engine.close()
    assert batch == single
    assert not any(a.skipped for a in batch)
    assert {a.decision.value for a in batch} == {"ALLOW", "STEP_UP", "BLOCK"}


def txn(n: int, **kw: object) -> Txn:
    base: dict[str, object] = {
        "payer": f"p{n}@ybl",
        "payee": "shop@okicici",
        "amount_paise": 10_000 + n,
        "at": T0 + timedelta(seconds=n),
        "device_id": f"d{n}",
    }
    base.update(kw)
    return Txn(**base)  # type: ignore[arg-type]


class Sleepy:
    """Sleeps ``per_payment_s`` for each payment it scores."""

    def __init__(self, name: str, per_payment_s: float) -> None:
        self.name = name
        self.per_payment_s = per_payment_s

    def score(self, txn: Txn, history: History) -> Signal:
        time.sleep(self.per_payment_s)
        return Signal(0.1, (f"{self.name.upper()}_SEEN",))


class FailsOn:
    """Raises for one payment, answers for the others."""

    name = "location"

    def __init__(self, amount: int) -> None:
        self.amount = amount

    def score(self, txn: Txn, history: History) -> Signal:
        if txn.amount_paise == self.amount:
            raise RuntimeError("boom")
        return Signal(0.0)


async def test_a_scorer_over_its_batch_budget_is_skipped_for_the_whole_round():
    engine = FraudEngine(
        [Sleepy("velocity", 0.0), Sleepy("model", 0.3)],
        budgets_s={"velocity": 1.0, "model": 0.05},
        per_payment_s=0.001,
    )
    txns = [txn(n) for n in range(10)]
    started = time.perf_counter()
    assessments = await engine.assess_batch(txns, [History()] * 10)
    elapsed = time.perf_counter() - started
    engine.close()
    assert elapsed < 0.3  # waited 0.05 + 9 x 0.001 s, not for the slow one
    assert all(a.skipped == ("model",) for a in assessments)
    assert all("SCORER_SKIPPED_MODEL" in a.reasons for a in assessments)
    assert all(a.scores == {"velocity": 0.1} for a in assessments)


async def test_each_payment_of_a_batch_adds_to_the_budget():
    """40 payments at 2 ms each: 80 ms, over the 30 ms per-payment budget, within
    30 ms + 39 x 5 ms; without the per-payment allowance the scorer would be skipped."""
    txns = [txn(n) for n in range(40)]
    for per_payment_s, skipped in ((0.005, ()), (0.0, ("velocity",))):
        engine = FraudEngine(
            [Sleepy("velocity", 0.002)], budgets_s={"velocity": 0.03}, per_payment_s=per_payment_s
        )
        assert engine.budget_s("velocity") == 0.03
        assert engine.budget_s("velocity", 40) == pytest.approx(0.03 + 39 * per_payment_s)
        assessments = await engine.assess_batch(txns, [History()] * 40)
        engine.close()
        assert {a.skipped for a in assessments} == {skipped}, per_payment_s


async def test_a_scorer_failing_on_one_payment_is_skipped_for_that_payment_only():
    engine = FraudEngine(
        [Sleepy("velocity", 0.0), FailsOn(10_003)], budgets_s={"velocity": 1.0, "location": 1.0}
    )
    txns = [txn(n) for n in range(6)]
    assessments = await engine.assess_batch(txns, [History()] * 6)
    engine.close()
    assert [a.skipped for a in assessments] == [(), (), (), ("location",), (), ()]


async def test_every_scorer_failing_steps_the_whole_round_up():
    engine = FraudEngine([Sleepy("model", 0.3)], budgets_s={"model": 0.02}, per_payment_s=0.0)
    assessments = await engine.assess_batch([txn(1), txn(2)], [History(), History()])
    engine.close()
    assert all(a.decision.value == "STEP_UP" for a in assessments)
    assert all(a.reasons[0] == "FRAUD_SCORERS_UNAVAILABLE" for a in assessments)


# --------------------------------------------------------------------------- rounds


def test_rounds_put_each_payment_after_its_payers_and_its_devices_earlier_ones():
    txns = [
        txn(0, payer="a@ybl", device_id="da"),
        txn(1, payer="b@ybl", device_id="db"),
        txn(2, payer="a@ybl", device_id="da"),  # a again: after 0
        txn(3, payer="c@ybl", device_id="db"),  # b's phone: after 1
        txn(4, payer="d@ybl", device_id=None),  # shares nothing: the first round
        txn(5, payer="a@ybl", device_id="dz"),  # a a third time: after 2
        txn(6, payer="e@ybl", device_id=None),
    ]
    assert split_rounds(txns) == [[0, 1, 4, 6], [2, 3], [5]]
    assert split_rounds([]) == []
    distinct = [txn(n) for n in range(50)]
    assert split_rounds(distinct) == [list(range(50))]


@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.one_of(st.none(), st.integers(0, 4))),
        max_size=60,
    )
)
def test_rounds_keep_every_payers_and_devices_order(spec: list[tuple[int, int | None]]):
    txns = [
        txn(n, payer=f"p{p}@ybl", device_id=None if d is None else f"d{d}")
        for n, (p, d) in enumerate(spec)
    ]
    rounds = split_rounds(txns)
    round_of = {i: k for k, positions in enumerate(rounds) for i in positions}
    assert sorted(round_of) == list(range(len(txns)))  # each payment once
    assert all(positions == sorted(positions) and positions for positions in rounds)
    for i, a in enumerate(txns):
        for j in range(i + 1, len(txns)):
            b = txns[j]
            if a.payer == b.payer or (a.device_id is not None and a.device_id == b.device_id):
                assert round_of[i] < round_of[j], (i, j)
    # As few rounds as the longest chain of payments sharing a payer or device needs:
    # every round but the first has a payment that had to wait for the round before.
    for k in range(1, len(rounds)):
        assert any(
            any(
                round_of[i] == k - 1
                and i < j
                and (
                    txns[i].payer == txns[j].payer
                    or (txns[j].device_id is not None and txns[i].device_id == txns[j].device_id)
                )
                for i in range(len(txns))
            )
            for j in rounds[k]
        )

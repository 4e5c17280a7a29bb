"""Scoring a batch: the vectorised model. No database."""

from __future__ import annotations

import math

import pytest

from fraud.model import CompiledTrees, load_model
from fraud.scorers import ModelScorer
from fraud.simulator import featurise, simulate


@pytest.fixture(scope="module")
def estimator():
    return load_model().estimator


@pytest.fixture(scope="module")
def traffic():
    """Simulated payments (every typology) with their features and in-memory histories."""
    return list(featurise(simulate(5, payers=200, days=1.0, scale=0.3)))


# --------------------------------------------------------------------------- the model


def test_batch_model_scores_are_predict_ones_bit_for_bit(estimator, traffic):
    compiled = CompiledTrees(estimator)
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


def test_a_row_with_a_missing_feature_takes_the_exact_path(estimator, traffic):
    compiled = CompiledTrees(estimator)
    xs = [list(vector) for _, vector, _ in traffic[:50]]
    xs[7][12] = math.nan  # implied speed unknown: the trees' missing-value branches
    many = compiled.predict_many(xs)
    assert many == [compiled.predict_one(x) for x in xs]
    assert many[7] == pytest.approx(float(estimator.predict_proba([xs[7]])[0, 1]), abs=1e-12)


def test_model_scorer_scores_a_batch_as_one_payment_at_a_time(estimator, traffic):
    scorer = ModelScorer(estimator, "v")
    txns = [item.txn for item, _, _ in traffic]
    histories = [history for _, _, history in traffic]
    assert scorer.score_batch(txns, histories) == [
        scorer.score(t, h) for t, h in zip(txns, histories, strict=True)
    ]

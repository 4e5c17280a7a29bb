"""The fraud model: training on simulated traffic, evaluation on held-out traffic, and the
shipped, versioned artefact.

* Training data: :func:`fraud.simulator.simulate` with the training seed; features from
  :func:`fraud.features.feature_vector`, the same code that scores live payments.
* Held-out data: an independent simulated world (seed + :data:`HELD_OUT_OFFSET`): other
  payers, other cities, other incidents.
* Estimator: scikit-learn's ``HistGradientBoostingClassifier``, fixed hyper-parameters,
  no early stopping, so a seed gives the same model.
* Artefact: ``fraud/artifacts/model.skops`` (skops format: loading it never unpickles
  arbitrary objects; only the types in :data:`TRUSTED_TYPES` are accepted) and
  ``model.json`` (version, seed, features, the file's SHA-256, held-out metrics). The
  version is ``hgb-<seed>-<fingerprint>``, the fingerprint being a hash of the model's
  answers on a fixed probe set (:func:`fingerprint`): the same for the same model
  whatever the file's bytes (skops names its members by memory address), different for
  any other model.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraud.features import FEATURE_NAMES

__all__ = [
    "ARTIFACTS",
    "DEFAULT_SEED",
    "HELD_OUT_OFFSET",
    "TRUSTED_TYPES",
    "CompiledTrees",
    "LoadedModel",
    "evaluate",
    "fingerprint",
    "load_model",
    "save_model",
    "train",
]

ARTIFACTS = Path(__file__).parent / "artifacts"
DEFAULT_SEED = 20261125
HELD_OUT_OFFSET = 1_000_003
PROBE_SEED = 7
# Types beyond skops' own safe defaults (numpy arrays, sklearn estimators) that the file
# may hold. Anything else in a model file is refused before it is loaded.
TRUSTED_TYPES = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]


class CompiledTrees:
    """The trained ensemble as plain Python lists, to score one payment in about a tenth of a
    millisecond: scikit-learn's ``predict_proba`` spends a millisecond on validation and
    thread start-up for a single row (and more when the CPU is busy). Same numbers: the
    test suite checks it against ``predict_proba`` on simulated traffic.

    Built from the fitted estimator's trees (``_predictors``, ``_baseline_prediction``): a
    binary ``HistGradientBoostingClassifier`` without categorical features."""

    def __init__(self, estimator: Any) -> None:
        self.baseline = float(estimator._baseline_prediction.ravel()[0])
        self.trees: list[
            tuple[list[int], list[float], list[int], list[int], list[bool], list[float], list[bool]]
        ] = []
        for (predictor,) in estimator._predictors:
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                raise ValueError("categorical splits are not supported")
            self.trees.append(
                (
                    [int(v) for v in nodes["feature_idx"]],
                    [float(v) for v in nodes["num_threshold"]],
                    [int(v) for v in nodes["left"]],
                    [int(v) for v in nodes["right"]],
                    [bool(v) for v in nodes["is_leaf"]],
                    [float(v) for v in nodes["value"]],
                    [bool(v) for v in nodes["missing_go_to_left"]],
                )
            )

    def predict_one(self, x: list[float]) -> float:
        raw = self.baseline
        for feature, threshold, left, right, leaf, value, missing_left in self.trees:
            node = 0
            while not leaf[node]:
                v = x[feature[node]]
                if v != v:  # NaN
                    node = left[node] if missing_left[node] else right[node]
                elif v <= threshold[node]:
                    node = left[node]
                else:
                    node = right[node]
            raw += value[node]
        return 1.0 / (1.0 + math.exp(-raw))


@dataclass(frozen=True)
class LoadedModel:
    estimator: Any
    version: str
    meta: dict[str, Any]


def _dataset(seed: int, **sim: Any) -> tuple[list[list[float]], list[int], list[Any]]:
    from fraud.simulator import featurise, simulate

    xs: list[list[float]] = []
    ys: list[int] = []
    rows: list[Any] = []
    for item, vector, history in featurise(simulate(seed, **sim)):
        xs.append(vector)
        ys.append(int(item.fraud))
        rows.append((item, history))
    return xs, ys, rows


def train(seed: int = DEFAULT_SEED, **sim: Any) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    xs, ys, _ = _dataset(seed, **sim)
    model = HistGradientBoostingClassifier(
        max_iter=100,
        learning_rate=0.1,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=seed,
    )
    model.fit(xs, ys)
    return model


def save_model(model: Any, out_dir: Path, seed: int, metrics: dict[str, Any]) -> str:
    import skops.io as sio

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.skops"
    sio.dump(model, path, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    version = f"hgb-{seed}-{fingerprint(model)}"
    meta = {
        "version": version,
        "seed": seed,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
        "features": list(FEATURE_NAMES),
        "held_out": metrics,
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return version


def load_model(directory: Path | None = None) -> LoadedModel:
    """Load with skops, refusing any type outside :data:`TRUSTED_TYPES`."""
    import skops.io as sio

    directory = directory or ARTIFACTS
    path = directory / "model.skops"
    data = path.read_bytes()
    meta = json.loads((directory / "model.json").read_text())
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{path}: does not match the SHA-256 recorded in model.json")
    untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
    if untrusted:
        raise ValueError(f"{path}: refusing to load untrusted types {sorted(untrusted)}")
    estimator = sio.loads(data, trusted=TRUSTED_TYPES)
    if meta.get("features") != list(FEATURE_NAMES):
        raise ValueError(f"{path}: trained on other features than this code computes")
    return LoadedModel(estimator, str(meta["version"]), meta)


def fingerprint(estimator: Any) -> str:
    """12 hex of the SHA-256 of the model's answers (to 1e-6) on a fixed probe set."""
    xs, _, _ = _dataset(PROBE_SEED, payers=200, days=1.0, scale=0.1)
    answers = ",".join(f"{p:.6f}" for p in estimator.predict_proba(xs)[:, 1])
    return hashlib.sha256(answers.encode()).hexdigest()[:12]


def _at(scores: list[float], labels: list[int], threshold: float) -> dict[str, float]:
    flagged = [y for s, y in zip(scores, labels, strict=True) if s >= threshold]
    positives = sum(labels)
    tp = sum(flagged)
    return {
        "threshold": threshold,
        "precision": round(tp / len(flagged), 4) if flagged else 0.0,
        "recall": round(tp / positives, 4) if positives else 0.0,
        "flagged_share": round(len(flagged) / len(labels), 4),
    }


def evaluate(
    model: LoadedModel,
    seed: int = DEFAULT_SEED,
    step_up: float = 0.4,
    block: float = 0.7,
    **sim: Any,
) -> dict[str, Any]:
    """Held-out metrics of the model alone and of the whole engine (rules + model)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from fraud.combiner import Thresholds
    from fraud.engine import FraudEngine
    from fraud.scorers import DeviceScorer, LocationScorer, VelocityScorer

    xs, ys, rows = _dataset(seed + HELD_OUT_OFFSET, **sim)
    model_scores = [float(p) for p in model.estimator.predict_proba(xs)[:, 1]]
    engine = FraudEngine(
        [
            VelocityScorer(),
            LocationScorer(),
            DeviceScorer(),
            _Precomputed(
                {id(item.txn): s for (item, _), s in zip(rows, model_scores, strict=True)}
            ),
        ],
        budgets_s={},
        thresholds=Thresholds(block=block, step_up=step_up),
    )
    combined: list[float] = []
    by_typology: dict[str, list[int]] = {}
    for item, history in rows:
        assessment = engine.assess_now(item.txn, history)
        combined.append(assessment.score)
        caught = int(assessment.score >= step_up)
        by_typology.setdefault(item.typology, []).append(caught)
    engine.close()
    return {
        "model_version": model.version,
        "held_out_seed": seed + HELD_OUT_OFFSET,
        "payments": len(ys),
        "fraud_share": round(sum(ys) / len(ys), 4),
        "roc_auc": round(float(roc_auc_score(ys, model_scores)), 4),
        "pr_auc": round(float(average_precision_score(ys, model_scores)), 4),
        "model_at_thresholds": {
            "step_up": _at(model_scores, ys, step_up),
            "block": _at(model_scores, ys, block),
        },
        "combined": {
            "roc_auc": round(float(roc_auc_score(ys, combined)), 4),
            "pr_auc": round(float(average_precision_score(ys, combined)), 4),
            "step_up": _at(combined, ys, step_up),
            "block": _at(combined, ys, block),
        },
        "flagged_by_typology": {
            name: round(sum(v) / len(v), 4) for name, v in sorted(by_typology.items())
        },
    }


class _Precomputed:
    """The model's scores for the held-out set, computed in one batch (much faster than one
    row at a time; the same numbers as :class:`~fraud.scorers.ModelScorer`'s compiled trees,
    tests/unit/test_fraud.py), served to the engine as the ``model`` scorer, by payment."""

    name = "model"

    def __init__(self, scores_by_txn: dict[int, float]) -> None:
        self.scores_by_txn = scores_by_txn  # keyed by id() of the held-out Txn objects

    def score(self, txn: Any, history: Any) -> Any:
        from fraud.scorers import model_signal

        return model_signal(self.scores_by_txn[id(txn)])


def main_train(seed: int, out_dir: Path) -> dict[str, Any]:
    """Train, measure on held-out traffic, save: what ``upi-engine fraud train`` does."""
    estimator = train(seed)
    scratch = LoadedModel(estimator, "unsaved", {})
    metrics = evaluate(scratch, seed)
    metrics.pop("model_version")
    version = save_model(estimator, out_dir, seed, metrics)
    return {"version": version, "seed": seed, "out": str(out_dir), "held_out": metrics}

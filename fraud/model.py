"""The fraud model: training on simulated traffic, evaluation on held-out traffic, and the
shipped, versioned artefact.

* Training data: :func:`fraud.simulator.simulate` with the training seed; features from
  :func:`fraud.features.feature_vector`, the same code that scores live payments.
* Calibration data: another independent world (seed + :data:`CALIBRATION_OFFSET`), on
  which the decision thresholds are chosen (:func:`calibrate`): the lowest step-up
  threshold at which at most :data:`ORDINARY_FLAGGED_TARGET` of ordinary payments are
  stepped up or blocked (the lowest is the best recall), and the lowest block threshold at
  which at most :data:`ORDINARY_BLOCKED_TARGET` are blocked. They ship in ``model.json``
  and are the engine's defaults (``UPI_FRAUD_*_THRESHOLD`` override them).
* Held-out data: an independent simulated world (seed + :data:`HELD_OUT_OFFSET`): other
  payers, other cities, other incidents; the metrics are measured there, at the shipped
  thresholds, by typology.
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

import functools
import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fraud.features import FEATURE_NAMES

__all__ = [
    "ARTIFACTS",
    "CALIBRATION_OFFSET",
    "DEFAULT_SEED",
    "HELD_OUT_OFFSET",
    "TRUSTED_TYPES",
    "CompiledTrees",
    "LoadedModel",
    "calibrate",
    "evaluate",
    "fingerprint",
    "load_model",
    "save_model",
    "train",
]

ARTIFACTS = Path(__file__).parent / "artifacts"
TREES_FILE = "model.trees.json"
DEFAULT_SEED = 20261125
HELD_OUT_OFFSET = 1_000_003
CALIBRATION_OFFSET = 2_000_006
# At most this share of ordinary payments stepped up or blocked on the calibration world
# (the goal is 1 %; the margin is for another world's sampling noise), and blocked.
ORDINARY_FLAGGED_TARGET = 0.007
ORDINARY_BLOCKED_TARGET = 0.001
PROBE_SEED = 7
# Types beyond skops' own safe defaults (numpy arrays, sklearn estimators) that the file
# may hold. Anything else in a model file is refused before it is loaded.
TRUSTED_TYPES = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]


class CompiledTrees:
    """The trained ensemble compiled at load, to score payments without scikit-learn's
    per-call overhead: its ``predict_proba`` spends a millisecond on validation and thread
    start-up for a single row, and more when the CPU is busy (12 ms for 200 rows on the
    loaded 2-core VM). Same numbers: the test suite checks it against ``predict_proba`` on
    simulated traffic.

    * :meth:`predict_one` walks plain Python lists: 30-40 µs for one payment;
    * :meth:`predict_many` walks every tree for every row at once with numpy, one level at a
      time (about 5 µs a row for 200 rows, 7 µs a row for 50), and gives *bit for bit*
      :meth:`predict_one`'s numbers: the same comparisons, the leaf values added in the
      same order from the same baseline, the same ``math.exp``. Below
      :data:`VECTOR_MIN_ROWS` rows, or for a row with a missing (NaN) feature, it uses
      :meth:`predict_one`.

    Built from the fitted estimator's trees (:meth:`of`: ``_predictors``,
    ``_baseline_prediction``; a binary ``HistGradientBoostingClassifier`` without
    categorical features), or read from the trees file :func:`save_model` writes beside the
    estimator (:meth:`from_json`): an engine scores with these alone, so it starts without
    importing scikit-learn (2.5-3 s of CPU on the 2-core VM, at every start)."""

    VECTOR_MIN_ROWS = 4  # numpy's fixed cost (~0.1 ms) is worth it from about 4 rows

    def __init__(self, baseline: float, trees: list[_Tree]) -> None:
        self.baseline = baseline
        self.trees = trees
        self._vector = _VectorTrees(self.trees)

    @classmethod
    def of(cls, estimator: Any) -> CompiledTrees:
        trees: list[_Tree] = []
        for (predictor,) in estimator._predictors:
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                raise ValueError("categorical splits are not supported")
            trees.append(
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
        return cls(float(estimator._baseline_prediction.ravel()[0]), trees)

    _FIELDS = ("feature", "threshold", "left", "right", "is_leaf", "value", "missing_left")

    def to_json(self) -> bytes:
        """The trees as JSON: plain numbers (a float's shortest repr reads back the same
        float64), no code; :meth:`from_json` gives the same predictions bit for bit."""
        for tree in self.trees:
            if not all(math.isfinite(v) for v in (*tree[1], *tree[5])):
                raise ValueError("a threshold or leaf value is not finite")
        document = {
            "baseline": self.baseline,
            "trees": [dict(zip(self._FIELDS, tree, strict=True)) for tree in self.trees],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CompiledTrees:
        document = json.loads(data)
        trees: list[_Tree] = []
        for tree in document["trees"]:
            feature, threshold, left, right, is_leaf, value, missing_left = (
                tree[name] for name in cls._FIELDS
            )
            size = len(is_leaf)
            if any(len(column) != size for column in (feature, threshold, left, right, value)):
                raise ValueError("a tree's columns differ in length")
            inner = [i for i in range(size) if not is_leaf[i]]
            if not all(0 <= n < size for i in inner for n in (left[i], right[i])):
                raise ValueError("a tree points outside itself")
            trees.append(
                (
                    [int(v) for v in feature],
                    [float(v) for v in threshold],
                    [int(v) for v in left],
                    [int(v) for v in right],
                    [bool(v) for v in is_leaf],
                    [float(v) for v in value],
                    [bool(v) for v in missing_left],
                )
            )
        return cls(float(document["baseline"]), trees)

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

    def predict_many(self, xs: Sequence[list[float]]) -> list[float]:
        """:meth:`predict_one` of each row, the same numbers, faster for many rows."""
        if len(xs) < self.VECTOR_MIN_ROWS:
            return [self.predict_one(x) for x in xs]
        x = np.asarray(xs, dtype=np.float64)
        missing = np.isnan(x).any(axis=1)
        if missing.any():
            # Live features are never NaN (fraud.features); the tree walk below does not
            # know the missing-value branches, so such a row takes the exact path.
            out = self._vector.proba(self.baseline, np.nan_to_num(x))
            for i in np.flatnonzero(missing).tolist():
                out[i] = self.predict_one(xs[i])
            return out
        return self._vector.proba(self.baseline, x)


_Tree = tuple[list[int], list[float], list[int], list[int], list[bool], list[float], list[bool]]


class _VectorTrees:
    """All the trees as flat numpy arrays, walked for many rows at once.

    ``node`` holds, for each tree and row, the node reached so far (trees by rows). A leaf
    points to itself on both sides (and compares against +inf), so a row that reached its
    leaf stays there while the others go on, without a test. Trees are walked deepest
    first, and at each level only the trees that still have a level that deep, so the work
    is the sum of the trees' depths, not the deepest depth times the number of trees."""

    def __init__(self, trees: list[_Tree]) -> None:
        feature: list[int] = []
        threshold: list[float] = []
        left: list[int] = []
        right: list[int] = []
        value: list[float] = []
        roots: list[int] = []
        depths: list[int] = []
        for tree_feature, tree_threshold, tree_left, tree_right, leaf, tree_value, _ in trees:
            base = len(feature)
            roots.append(base)
            depths.append(_depth(tree_left, tree_right, leaf))
            for i, is_leaf in enumerate(leaf):
                feature.append(0 if is_leaf else tree_feature[i])
                threshold.append(math.inf if is_leaf else tree_threshold[i])
                left.append(base + (i if is_leaf else tree_left[i]))
                right.append(base + (i if is_leaf else tree_right[i]))
                value.append(tree_value[i])
        deepest_first = sorted(range(len(trees)), key=lambda t: -depths[t])
        self._roots = np.array([roots[t] for t in deepest_first], dtype=np.intp)
        # The first ``k`` trees (deepest first) of each level that still need a step.
        self._levels = [
            sum(1 for t in deepest_first if depths[t] > level)
            for level in range(max(depths, default=0))
        ]
        # Back to the estimator's order, for adding the leaf values as predict_one does.
        self._original = np.argsort(np.array(deepest_first, dtype=np.intp))
        self._feature = np.array(feature, dtype=np.intp)
        self._threshold = np.array(threshold, dtype=np.float64)
        self._left = np.array(left, dtype=np.intp)
        self._right = np.array(right, dtype=np.intp)
        self._value = np.array(value, dtype=np.float64)

    def proba(self, baseline: float, x: Any) -> list[float]:
        rows = x.shape[0]
        by_feature = np.ascontiguousarray(x.T).ravel()  # feature f of row r at f * rows + r
        offset = self._feature * rows
        row = np.arange(rows, dtype=np.intp)
        node = np.repeat(self._roots[:, None], rows, axis=1)
        for k in self._levels:
            here = node[:k]
            v = by_feature[offset[here] + row]
            node[:k] = np.where(v <= self._threshold[here], self._left[here], self._right[here])
        terms = np.empty((len(self._roots) + 1, rows), dtype=np.float64)
        terms[0] = baseline
        terms[1:] = self._value[node[self._original]]
        # add.accumulate adds in sequence (a sum may pair terms up): baseline + tree 0 +
        # tree 1 + ..., exactly predict_one's order, so the same float64 result.
        raw = np.add.accumulate(terms, axis=0)[-1]
        return [1.0 / (1.0 + math.exp(-r)) for r in raw.tolist()]


def _depth(left: list[int], right: list[int], leaf: list[bool]) -> int:
    """Edges from the root (node 0) to the deepest leaf."""
    deepest = 0
    stack = [(0, 0)]
    while stack:
        node, depth = stack.pop()
        if leaf[node]:
            deepest = max(deepest, depth)
        else:
            stack.append((left[node], depth + 1))
            stack.append((right[node], depth + 1))
    return deepest


@dataclass(frozen=True)
class LoadedModel:
    """A model of :func:`load_model`: its compiled trees, what the engine scores with, and
    the fitted estimator, read (with scikit-learn) only when asked for: training and
    ``fraud evaluate`` use it, a serving engine does not."""

    trees: CompiledTrees
    version: str
    meta: dict[str, Any]
    _estimator: Any = field(default=None, repr=False, compare=False)
    _directory: Path | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, estimator: Any, version: str, meta: dict[str, Any]) -> LoadedModel:
        return cls(CompiledTrees.of(estimator), version, meta, estimator)

    @functools.cached_property
    def estimator(self) -> Any:
        if self._estimator is not None:
            return self._estimator
        assert self._directory is not None
        return _load_estimator(self._directory, self.meta)


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


def save_model(
    model: Any,
    out_dir: Path,
    seed: int,
    metrics: dict[str, Any],
    thresholds: dict[str, Any] | None = None,
) -> str:
    import skops.io as sio

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.skops"
    sio.dump(model, path, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    trees = CompiledTrees.of(model).to_json()
    (out_dir / TREES_FILE).write_bytes(trees)
    version = f"hgb-{seed}-{fingerprint(model)}"
    meta = {
        "version": version,
        "seed": seed,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "trees_sha256": hashlib.sha256(trees).hexdigest(),
        "estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
        "features": list(FEATURE_NAMES),
        "held_out": metrics,
        "thresholds": thresholds or {"step_up": 0.4, "block": 0.7},
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return version


def load_model(directory: Path | None = None) -> LoadedModel:
    """The model of ``directory`` (default: the shipped one): its compiled trees from the
    trees file, checked against the SHA-256 that ``model.json`` records; the estimator
    (``.estimator``) loads when first asked for. A model directory without a trees file
    (written before it existed) has its estimator loaded and compiled now."""
    directory = directory or ARTIFACTS
    meta = json.loads((directory / "model.json").read_text())
    if meta.get("features") != list(FEATURE_NAMES):
        raise ValueError(f"{directory}: trained on other features than this code computes")
    version = str(meta["version"])
    trees_path = directory / TREES_FILE
    if "trees_sha256" not in meta:
        estimator = _load_estimator(directory, meta)
        return LoadedModel(CompiledTrees.of(estimator), version, meta, estimator, directory)
    data = trees_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["trees_sha256"]:
        raise ValueError(f"{trees_path}: does not match the SHA-256 recorded in model.json")
    return LoadedModel(CompiledTrees.from_json(data), version, meta, None, directory)


def _load_estimator(directory: Path, meta: dict[str, Any]) -> Any:
    """The fitted estimator, with skops, refusing any type outside :data:`TRUSTED_TYPES`."""
    import skops.io as sio

    path = directory / "model.skops"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{path}: does not match the SHA-256 recorded in model.json")
    untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
    if untrusted:
        raise ValueError(f"{path}: refusing to load untrusted types {sorted(untrusted)}")
    return sio.loads(data, trusted=TRUSTED_TYPES)


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


@dataclass(frozen=True)
class _Scored:
    """A simulated world scored by the whole engine: per payment its typology, the
    model's score and the combined score."""

    labels: list[int]
    typologies: list[str]
    model_scores: list[float]
    combined: list[float]


def _score_world(estimator: Any, seed: int, **sim: Any) -> _Scored:
    from fraud.engine import FraudEngine
    from fraud.scorers import DeviceScorer, LocationScorer, VelocityScorer

    xs, ys, rows = _dataset(seed, **sim)
    model_scores = [float(p) for p in estimator.predict_proba(xs)[:, 1]]
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
    )
    combined = [engine.assess_now(item.txn, history).score for item, history in rows]
    engine.close()
    return _Scored(ys, [item.typology for item, _ in rows], model_scores, combined)


def _lowest_threshold(ordinary: list[float], share: float, floor: float = 0.0) -> float:
    """The lowest threshold on a 0.001 grid, at least ``floor``, at which at most ``share``
    of the ``ordinary`` scores reach it."""
    ranked = sorted(ordinary, reverse=True)
    allowed = int(share * len(ranked))  # this many may reach it
    # The (allowed + 1)-th highest ordinary score must stay below the threshold.
    above = ranked[allowed] if allowed < len(ranked) else 0.0
    threshold = max(math.floor(above * 1000) / 1000 + 0.001, floor)
    return round(min(threshold, 1.0), 3)


def calibrate(
    estimator: Any,
    seed: int = DEFAULT_SEED,
    flagged_target: float = ORDINARY_FLAGGED_TARGET,
    blocked_target: float = ORDINARY_BLOCKED_TARGET,
    **sim: Any,
) -> dict[str, Any]:
    """The step-up and block thresholds, chosen on the calibration world: the lowest (so
    the best recall) at which at most ``flagged_target`` of ordinary payments are stepped
    up or blocked, and at which at most ``blocked_target`` are blocked."""
    # Twice the size of the others: the thresholds sit in the tail of the ordinary
    # scores, a few hundred payments, and a bigger world moves them less by chance.
    size = {"payers": 10_000, "scale": 2.0, **sim}
    world = _score_world(estimator, seed + CALIBRATION_OFFSET, **size)
    ordinary = [s for s, y in zip(world.combined, world.labels, strict=True) if not y]
    step_up = _lowest_threshold(ordinary, flagged_target)
    block = _lowest_threshold(ordinary, blocked_target, floor=step_up)
    return {
        "step_up": step_up,
        "block": block,
        "calibration_seed": seed + CALIBRATION_OFFSET,
        "ordinary_flagged_target": flagged_target,
        "ordinary_blocked_target": blocked_target,
    }


def _by_typology(world: _Scored, step_up: float, block: float) -> dict[str, dict[str, float]]:
    found: dict[str, list[tuple[float, ...]]] = {}
    for typology, score in zip(world.typologies, world.combined, strict=True):
        found.setdefault(typology, []).append((score >= step_up, score >= block))
    return {
        name: {
            "payments": len(v),
            "stepped_up_or_blocked": round(sum(f for f, _ in v) / len(v), 4),
            "blocked": round(sum(b for _, b in v) / len(v), 4),
        }
        for name, v in sorted(found.items())
    }


def evaluate(
    model: LoadedModel,
    seed: int = DEFAULT_SEED,
    step_up: float | None = None,
    block: float | None = None,
    **sim: Any,
) -> dict[str, Any]:
    """Held-out metrics of the model alone and of the whole engine (rules + model), at the
    given thresholds (default: the model's calibrated ones), by typology: the recall of
    each fraud typology (stepped up or blocked) and the ordinary payments' false-positive
    rate."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    shipped = model.meta.get("thresholds", {})
    step_up = float(shipped.get("step_up", 0.4)) if step_up is None else step_up
    block = float(shipped.get("block", 0.7)) if block is None else block
    world = _score_world(model.estimator, seed + HELD_OUT_OFFSET, **sim)
    ys, combined = world.labels, world.combined
    by_typology = _by_typology(world, step_up, block)
    ordinary = by_typology.pop("legit")
    return {
        "model_version": model.version,
        "held_out_seed": seed + HELD_OUT_OFFSET,
        "payments": len(ys),
        "fraud_share": round(sum(ys) / len(ys), 4),
        "thresholds": {"step_up": step_up, "block": block},
        "roc_auc": round(float(roc_auc_score(ys, world.model_scores)), 4),
        "pr_auc": round(float(average_precision_score(ys, world.model_scores)), 4),
        "model_at_thresholds": {
            "step_up": _at(world.model_scores, ys, step_up),
            "block": _at(world.model_scores, ys, block),
        },
        "combined": {
            "roc_auc": round(float(roc_auc_score(ys, combined)), 4),
            "pr_auc": round(float(average_precision_score(ys, combined)), 4),
            "step_up": _at(combined, ys, step_up),
            "block": _at(combined, ys, block),
        },
        "ordinary": {
            "payments": ordinary["payments"],
            "false_positive_rate": ordinary["stepped_up_or_blocked"],
            "blocked": ordinary["blocked"],
        },
        "recall_by_typology": by_typology,
        "flagged_by_typology": {
            "legit": ordinary["stepped_up_or_blocked"],
            **{name: v["stepped_up_or_blocked"] for name, v in by_typology.items()},
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
    """Train, choose the thresholds on the calibration world, measure on the held-out
    world at those thresholds, save: what ``upi-engine fraud train`` does."""
    estimator = train(seed)
    thresholds = calibrate(estimator, seed)
    scratch = LoadedModel.of(estimator, "unsaved", {"thresholds": thresholds})
    metrics = evaluate(scratch, seed)
    metrics.pop("model_version")
    version = save_model(estimator, out_dir, seed, metrics, thresholds)
    return {
        "version": version,
        "seed": seed,
        "out": str(out_dir),
        "thresholds": thresholds,
        "held_out": metrics,
    }

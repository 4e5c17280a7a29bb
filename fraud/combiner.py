"""How four scores become one decision. The one place for the fraud policy.

Method: a **weighted noisy-OR**. Each scorer's score is read as the probability that its
evidence alone means fraud, discounted by the scorer's weight (how much we trust it);
the combined score is the probability that at least one piece of evidence is right:

    combined = 1 - Π over answered scorers of (1 - weight · score)

Unlike a sum it stays in [0, 1]; unlike a maximum, two moderate signals together count for
more than either alone; a scorer with nothing to say (score 0) changes nothing.

Decision: ``BLOCK`` at ``combined >= block`` (0.7 by default), ``STEP_UP`` at
``combined >= step_up`` (0.4), else ``ALLOW``.

Failure policy: a scorer that errs or overruns its time budget is *skipped*, named in
``skipped`` and in the reasons (``SCORER_SKIPPED_<NAME>``), and the others decide. If no
scorer answers, the decision is ``STEP_UP`` (reason ``FRAUD_SCORERS_UNAVAILABLE``): never a
silent ``ALLOW``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from core.events import FraudDecision
from fraud.scorers import Signal, noisy_or

__all__ = ["DEFAULT_WEIGHTS", "Assessment", "Thresholds", "combine"]

DEFAULT_WEIGHTS: dict[str, float] = {
    "velocity": 1.0,
    "location": 1.0,
    "device": 1.0,
    # The model sees the same evidence as the rules; weighted lower so that one fact
    # noticed twice is not counted as two.
    "model": 0.8,
}


@dataclass(frozen=True)
class Thresholds:
    block: float = 0.7
    step_up: float = 0.4

    def __post_init__(self) -> None:
        if not 0 <= self.step_up <= self.block <= 1:
            raise ValueError("fraud thresholds need 0 <= step_up <= block <= 1")

    def decide(self, score: float) -> FraudDecision:
        if score >= self.block:
            return FraudDecision.BLOCK
        if score >= self.step_up:
            return FraudDecision.STEP_UP
        return FraudDecision.ALLOW


@dataclass(frozen=True)
class Assessment:
    decision: FraudDecision
    score: float
    scores: dict[str, float]
    reasons: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    # Each scorer that answered: its own score and reasons (the explanation ledgered).
    signals: Mapping[str, Signal] = field(default_factory=dict)


def combine(
    signals: Mapping[str, Signal],
    skipped: tuple[str, ...] = (),
    thresholds: Thresholds | None = None,
    weights: Mapping[str, float] | None = None,
) -> Assessment:
    thresholds = thresholds or Thresholds()
    weights = DEFAULT_WEIGHTS if weights is None else weights
    skipped_reasons = tuple(f"SCORER_SKIPPED_{name.upper()}" for name in skipped)
    if not signals:
        return Assessment(
            FraudDecision.STEP_UP,
            thresholds.step_up,
            {},
            ("FRAUD_SCORERS_UNAVAILABLE", *skipped_reasons),
            skipped,
        )
    score = round(noisy_or(weights.get(name, 1.0) * s.score for name, s in signals.items()), 6)
    reasons = tuple(dict.fromkeys(r for s in signals.values() for r in s.reasons))
    return Assessment(
        thresholds.decide(score),
        score,
        {name: s.score for name, s in signals.items()},
        reasons + skipped_reasons,
        skipped,
        dict(signals),
    )

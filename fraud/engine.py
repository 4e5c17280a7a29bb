"""Runs the scorers concurrently, each within its own time budget, and combines them.

Each scorer runs on a small thread pool, so a slow or stuck one (the model on a loaded
machine, say) cannot hold the event loop; the engine waits for each at most its budget.
One that overruns or raises is skipped and named (:mod:`fraud.combiner` says what then).

:meth:`FraudEngine.assess_batch` scores many payments (a round of the fraud consumer's
batch, :mod:`fraud.assessor`) with one job per scorer for all of them, not one per
payment: the model scores them vectorised, a rule scorer in a loop. Its budget for ``n``
payments is ``budget + (n - 1) * per_payment_s``. The per-payment budget stays the fixed
allowance it always was (a thread hop, a busy CPU); each further payment adds a little:
0.5 ms by default, when the four scorers together need about 15 µs of CPU a payment (the
model 11 µs of it, its features included), so a round within budget on a loaded machine
sharing the GIL is the rule. A stuck scorer thus delays a batch by a bounded time *per
payment*, far less than one payment alone could wait. A scorer that overruns is skipped
for every payment of the round; one that raises for a payment is skipped for that payment
only (a vectorised scorer answers for all of the round or raises for all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fraud.combiner import Assessment, Thresholds, combine
from fraud.features import History, Txn
from fraud.scorers import Scorer, Signal, score_each

__all__ = ["DEFAULT_BUDGET_S", "PER_PAYMENT_S", "FraudEngine"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 0.05  # a scorer without a budget of its own
PER_PAYMENT_S = 0.0005  # what each payment of a batch adds to a scorer's budget


def _timed(timings: dict[str, tuple[int, int]], name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the pool, its start and end kept under ``name`` in ``timings``."""
    start = time.time_ns()
    try:
        return fn(*args)
    finally:
        timings[name] = (start, time.time_ns())


class FraudEngine:
    def __init__(
        self,
        scorers: Sequence[Scorer],
        budgets_s: Mapping[str, float],
        thresholds: Thresholds | None = None,
        weights: Mapping[str, float] | None = None,
        workers: int = 8,
        per_payment_s: float = PER_PAYMENT_S,
    ) -> None:
        self.scorers = tuple(scorers)
        self.budgets_s = dict(budgets_s)
        self.per_payment_s = per_payment_s
        self.thresholds = thresholds or Thresholds()
        self.weights = weights
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fraud")

    def budget_s(self, name: str, payments: int = 1) -> float:
        """How long the engine waits for scorer ``name`` to score ``payments`` at once."""
        budget = self.budgets_s.get(name, DEFAULT_BUDGET_S)
        return budget + max(payments - 1, 0) * self.per_payment_s

    async def assess(self, txn: Txn, history: History) -> Assessment:
        loop = asyncio.get_running_loop()
        futures = {
            s.name: loop.run_in_executor(self._pool, s.score, txn, history) for s in self.scorers
        }

        async def bounded(name: str) -> Signal:
            return await asyncio.wait_for(futures[name], self.budget_s(name))

        names = list(futures)
        results = await asyncio.gather(*(bounded(n) for n in names), return_exceptions=True)
        signals: dict[str, Signal] = {}
        skipped: list[str] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, TimeoutError):
                    _log.warning("fraud scorer %s failed: %r", name, result)
                skipped.append(name)
                continue
            signals[name] = result
        return combine(signals, tuple(skipped), self.thresholds, self.weights)

    async def assess_batch(
        self,
        txns: Sequence[Txn],
        histories: Sequence[History],
        timings: dict[str, tuple[int, int]] | None = None,
    ) -> list[Assessment]:
        """:meth:`assess` of each payment (``histories[i]`` is ``txns[i]``'s), with one
        executor job per scorer for all of them, each within ``budget_s(name, n)``.

        ``timings``, if given, gets each scorer's job as ``(start, end)`` in
        ``time.time_ns()`` (one that overran: from its submission to when the engine
        stopped waiting), for the traces' scorer spans."""
        if len(txns) != len(histories):
            raise ValueError("one history per payment")
        if not txns:
            return []
        loop = asyncio.get_running_loop()
        names = [s.name for s in self.scorers]
        submitted = time.time_ns()
        jobs = [
            asyncio.wait_for(
                loop.run_in_executor(self._pool, score_each, s, txns, histories)
                if timings is None
                else loop.run_in_executor(
                    self._pool, _timed, timings, s.name, score_each, s, txns, histories
                ),
                self.budget_s(s.name, len(txns)),
            )
            for s in self.scorers
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        if timings is not None:
            ended = time.time_ns()
            for name in names:
                timings.setdefault(name, (submitted, ended))
        per_scorer: dict[str, list[Signal | BaseException]] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, TimeoutError):
                    _log.warning(
                        "fraud scorer %s failed on %d payments: %r", name, len(txns), result
                    )
                continue  # skipped for the whole round
            failures = [r for r in result if isinstance(r, BaseException)]
            if failures:
                _log.warning(
                    "fraud scorer %s failed on %d of %d payments: %r",
                    name,
                    len(failures),
                    len(txns),
                    failures[0],
                )
            per_scorer[name] = result
        assessments: list[Assessment] = []
        for i in range(len(txns)):
            signals: dict[str, Signal] = {}
            skipped: list[str] = []
            for name in names:
                answers = per_scorer.get(name)
                answer = answers[i] if answers is not None else None
                if answer is None or isinstance(answer, BaseException):
                    skipped.append(name)
                else:
                    signals[name] = answer
            assessments.append(combine(signals, tuple(skipped), self.thresholds, self.weights))
        return assessments

    def assess_now(self, txn: Txn, history: History) -> Assessment:
        """Every scorer, in this thread, no budgets: for evaluation on simulated traffic."""
        signals = {s.name: s.score(txn, history) for s in self.scorers}
        return combine(signals, (), self.thresholds, self.weights)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=False, cancel_futures=True)

"""Runs the scorers concurrently, each within its own time budget, and combines them.

Each scorer runs on a small thread pool, so a slow or stuck one (the model on a loaded
machine, say) cannot hold the event loop; the engine waits for each at most its budget.
One that overruns or raises is skipped and named (:mod:`fraud.combiner` says what then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from fraud.combiner import Assessment, Thresholds, combine
from fraud.features import History, Txn
from fraud.scorers import Scorer, Signal

__all__ = ["FraudEngine"]

_log = logging.getLogger(__name__)


class FraudEngine:
    def __init__(
        self,
        scorers: Sequence[Scorer],
        budgets_s: Mapping[str, float],
        thresholds: Thresholds | None = None,
        weights: Mapping[str, float] | None = None,
        workers: int = 8,
    ) -> None:
        self.scorers = tuple(scorers)
        self.budgets_s = dict(budgets_s)
        self.thresholds = thresholds or Thresholds()
        self.weights = weights
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fraud")

    async def assess(self, txn: Txn, history: History) -> Assessment:
        loop = asyncio.get_running_loop()
        futures = {
            s.name: loop.run_in_executor(self._pool, s.score, txn, history) for s in self.scorers
        }

        async def bounded(name: str) -> Signal:
            return await asyncio.wait_for(futures[name], self.budgets_s.get(name, 0.05))

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

    def assess_now(self, txn: Txn, history: History) -> Assessment:
        """Every scorer, in this thread, no budgets: for evaluation on simulated traffic."""
        signals = {s.name: s.score(txn, history) for s in self.scorers}
        return combine(signals, (), self.thresholds, self.weights)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=False, cancel_futures=True)

"""The loop of the engine's background workers (deemed resolver, verification expiry,
webhook dispatcher, fraud history pruning, ledger checkpoints): do a step; when it found
nothing to do, or failed, wait a while or until stopped; a step that did work is followed
by another at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from core.storage import database_unavailable

__all__ = ["PollingWorker", "poll_until_stopped"]

_log = logging.getLogger(__name__)


async def poll_until_stopped(
    name: str,
    step: Callable[[], Awaitable[int]],
    stopping: asyncio.Event,
    interval_s: Callable[[], float],
) -> None:
    """Run ``step`` (which returns how much work it did) until ``stopping`` is set."""
    while not stopping.is_set():
        try:
            done = await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if database_unavailable(exc):  # expected during an outage: one line, no trace
                _log.warning("%s: %s", name, str(exc).splitlines()[0])
            else:
                _log.warning("%s: %s", name, exc, exc_info=True)
            done = 0
        if done == 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s())


class PollingWorker:
    """A background worker: :meth:`run` repeats :meth:`step` on :func:`poll_until_stopped`,
    every ``interval_s`` while there is nothing to do, until :meth:`stop`."""

    name = "worker"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stopping = asyncio.Event()

    async def step(self) -> int:
        """Do one round of work; return how much was done (0: wait before the next)."""
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await poll_until_stopped(self.name, self.step, self._stopping, lambda: self.interval_s)

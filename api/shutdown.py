"""How the engine's processes stop: SIGTERM and SIGINT take one path.

``kill``, systemd, Kubernetes and ``docker stop`` send SIGTERM; a terminal sends SIGINT.
Both must leave nothing behind, above all not the embedded PostgreSQL: the process that
holds the last handle on it stops it (a fast shutdown, so the next start needs no crash
recovery) from its ``atexit`` hook, which runs only if the process *exits*. Python's default
for SIGTERM is to die on the spot, and uvicorn, after its graceful shutdown, raises the
signal it caught again with that default in place: the process died before ``atexit``, and
its PostgreSQL lived on (issue 19).

The order, for ``serve`` (every role) and ``npci-mock``:

1. the first signal stops accepting connections; requests in flight finish (10 s at most);
2. the lifespan's shutdown stops the engine: the relay and the polling workers finish their
   round, the consumers finish their batch, the pools close (``Engine.stop``);
3. extra gateway processes are sent SIGTERM and waited for (they take this same path);
4. the process exits 0, and the last holder of the embedded PostgreSQL stops it.

A second signal during that shutdown exits at once (status 1): the embedded server, if no
other process holds it, gets an immediate shutdown. Nothing acknowledged is lost: every
202 was committed, and PostgreSQL's own crash recovery covers the rest on the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

__all__ = ["exit_on_sigterm", "graceful_server"]

_log = logging.getLogger(__name__)
_HANDLED = (signal.SIGINT, signal.SIGTERM)


def graceful_server(config: uvicorn.Config, force_exit: Callable[[], None]) -> uvicorn.Server:
    """A uvicorn server for which SIGTERM is SIGINT: a graceful shutdown, then a normal
    return (so ``atexit`` runs); a second signal of either kind calls ``force_exit``.
    (uvicorn is imported here, not by every command.)"""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED}
            try:
                yield
            finally:
                # Shutting down goes on after the server (extra gateway processes, atexit's
                # stop of the embedded server): a signal then is a second one as well.
                for sig, handler in previous.items():
                    signal.signal(sig, self.handle_exit if self.should_exit else handler)
            # Unlike uvicorn's own, the caught signal is not raised again: the caller returns.

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:
                _log.warning("second signal during shutdown: exiting now")
                force_exit()
                return
            _log.info("shutting down", extra={"signal": signal.Signals(sig).name})
            self.should_exit = True

    return GracefulServer(config)


def exit_on_sigterm() -> None:
    """For every other command: SIGTERM raises ``SystemExit(143)`` in the main thread, as
    Ctrl-C raises ``KeyboardInterrupt``, so ``finally`` blocks and ``atexit`` run (the
    embedded server is released, a drill stops its regions)."""

    def terminate(sig: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, _exit_now)  # a second one does not wait
        raise SystemExit(128 + sig)

    signal.signal(signal.SIGTERM, terminate)


def _exit_now(sig: int, frame: FrameType | None) -> None:
    sys.stderr.flush()
    os._exit(128 + sig)

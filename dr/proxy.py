"""One URL for clients through a failover: a small TCP reverse proxy fed by the
orchestrator's routing table.

Each new client connection goes to the current route (the active region's engine). The
orchestrator pauses it while it fails over (new connections wait, up to a limit, instead
of reaching a region that is being fenced), then points it at the new region and resumes.
Connections open to a lost region break; clients retry with their ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["RoutingProxy"]

_log = logging.getLogger(__name__)


class RoutingProxy:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_wait_s: float = 20.0) -> None:
        self.host = host
        self.port = port
        self.max_wait_s = max_wait_s
        self.route: tuple[str, int] | None = None
        self._open = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def point_to(self, host: str, port: int) -> None:
        self.route = (host, port)
        self._open.set()
        _log.info("route → %s:%s", host, port)

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        if self.route is not None:
            self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._open.wait(), self.max_wait_s)
            assert self.route is not None
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.route), 5)
        except (TimeoutError, OSError):
            writer.close()
            return
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()

"""A fault-injecting TCP proxy for the fault tests (issue 14): between the engine and
PostgreSQL, or between the engine and the broker.

It runs its own event loop in a thread, so a synchronous test drives it while the engine
runs as a subprocess. Faults, each switchable while traffic flows:

- ``latency(s)``: every chunk, both ways, waits ``s`` seconds before it is forwarded;
- ``reset()``: every open connection is closed with a TCP RST (as a crashed peer or a
  middlebox would), in the middle of whatever it was doing;
- ``blackhole(s)``: for ``s`` seconds nothing is forwarded and new connections are held
  (a partition: TCP peers see silence, then the held bytes arrive, as after retransmits);
- ``cut(direction)``: one direction only (``"up"`` to the server or ``"down"`` to the
  client) is dropped, the other keeps flowing.

No maintained Python library does this without a daemon (Toxiproxy is a Go server), so it
is a small asyncio proxy here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Literal

__all__ = ["FaultProxy"]

Direction = Literal["up", "down"]


class FaultProxy:
    def __init__(self, upstream: tuple[str, int] | Path, port: int = 0) -> None:
        self.upstream = upstream
        self.port = port
        self.connections = 0
        self.resets = 0
        self._latency = 0.0
        self._blackhole_until = 0.0
        self._cut: set[Direction] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # -- life -----------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *_: object) -> None:
        self.clear()
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # -- faults ---------------------------------------------------------------------------
    def latency(self, seconds: float) -> None:
        self._latency = seconds

    def blackhole(self, seconds: float) -> None:
        self._blackhole_until = time.monotonic() + seconds

    def cut(self, direction: Direction) -> None:
        self._cut.add(direction)

    def clear(self) -> None:
        self._latency = 0.0
        self._blackhole_until = 0.0
        self._cut.clear()

    def reset(self) -> int:
        """RST every open connection now; returns how many."""
        return int(self._call(self._reset_all()))

    async def _reset_all(self) -> int:
        count = 0
        for writer in list(self._open):
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                if sock is not None:  # linger 0: close sends RST, not FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            count += 1
        self._open.clear()
        self.resets += count
        return count // 2  # each connection is two sockets (client side, server side)

    # -- forwarding -----------------------------------------------------------------------
    async def _held(self) -> None:
        while time.monotonic() < self._blackhole_until:
            await asyncio.sleep(0.02)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._held()
        try:
            if isinstance(self.upstream, Path):
                up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, "up"),
                self._pipe(up_reader, writer, "down"),
            )
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self._latency:
                    await asyncio.sleep(self._latency)
                await self._held()
                if direction in self._cut:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()  # one side gone: the other goes too

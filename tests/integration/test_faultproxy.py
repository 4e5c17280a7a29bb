"""The fault proxy of the fault tests (tests/faultproxy.py) does what it says, in front of
a small echo server: latency, RST, blackhole, one direction cut."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


@pytest.fixture
def echo() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # the reset test resets it
        while data := conn.recv(65536):
            conn.sendall(data)


async def _roundtrip(port: int, payload: bytes = b"ping", timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    finally:
        writer.close()


def test_forwards_and_adds_latency(echo):
    with FaultProxy(("127.0.0.1", echo)) as proxy:
        assert asyncio.run(_roundtrip(proxy.port)) == b"ping"
        proxy.latency(0.2)
        began = time.monotonic()
        assert asyncio.run(_roundtrip(proxy.port)) == b"ping"
        assert time.monotonic() - began >= 0.4  # 0.2 s each way


def test_reset_breaks_open_connections_with_rst(echo):
    async def scenario(proxy: FaultProxy) -> type[BaseException]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        await writer.drain()
        assert await reader.readexactly(1) == b"a"
        assert await asyncio.to_thread(proxy.reset) == 1
        try:
            writer.write(b"b")
            await writer.drain()
            await reader.readexactly(1)
        except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
            return type(exc)
        finally:
            writer.close()
        raise AssertionError("the connection survived the reset")

    with FaultProxy(("127.0.0.1", echo)) as proxy:
        assert asyncio.run(scenario(proxy)) in (ConnectionResetError, asyncio.IncompleteReadError)


def test_blackhole_holds_traffic_then_lets_it_through(echo):
    with FaultProxy(("127.0.0.1", echo)) as proxy:
        proxy.blackhole(1.0)
        began = time.monotonic()
        assert asyncio.run(_roundtrip(proxy.port)) == b"ping"
        assert time.monotonic() - began >= 0.9


def test_cut_drops_one_direction_only(echo):
    async def scenario(proxy: FaultProxy) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.cut("down")  # the server still gets the bytes; its answers are dropped
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.5)
        proxy.clear()
        writer.write(b"seen")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"seen"
        writer.close()

    with FaultProxy(("127.0.0.1", echo)) as proxy:
        asyncio.run(scenario(proxy))

"""Pure DR pieces: health hysteresis, the quorum setting, the routing proxy."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import asyncpg
from asyncpg import InternalClientError

from dr.orchestrator import Health, probe, quorum
from dr.proxy import RoutingProxy


def test_one_slow_answer_is_not_a_disaster():
    h = Health(fail_after=3, recover_after=2)
    assert h.record(False) and h.record(False)  # two misses: still up
    assert h.record(True) and h.failures == 0  # an answer resets the count
    assert h.record(False) and h.record(False)
    assert not h.record(False)  # the third miss in a row: down
    assert not h.record(True)  # one answer is not enough to come back
    assert h.record(True)


def test_quorum_commit_setting():
    assert quorum(["hyderabad", "chennai"]) == "ANY 1 (hyderabad, chennai)"
    assert quorum([]) == ""


async def _echo_server(tag: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(tag + data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _ask(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    await writer.drain()
    answer = await reader.read(100)
    writer.close()
    return answer


async def test_proxy_keeps_one_address_and_holds_connections_while_paused():
    a, b = await _echo_server(b"A:"), await _echo_server(b"B:")
    proxy = RoutingProxy(max_wait_s=5)
    await proxy.start()
    try:
        proxy.point_to("127.0.0.1", a.sockets[0].getsockname()[1])
        assert await _ask(proxy.port) == b"A:ping"
        proxy.pause()
        waiting = asyncio.create_task(_ask(proxy.port))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # held, not sent to a region being failed over
        proxy.point_to("127.0.0.1", b.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(waiting, 5) == b"B:ping"
        assert await _ask(proxy.port) == b"B:ping"
    finally:
        await proxy.stop()
        a.close()
        b.close()


class _BrokenConnection:
    """What asyncpg left once in a drill, when a region's server died mid-reply."""

    def __init__(self) -> None:
        self.terminated = self.closed = False

    async def fetchval(self, query: str) -> object:
        raise InternalClientError("cannot switch to state 12; another operation (2) is in progress")

    def terminate(self) -> None:
        self.terminated = True

    async def close(self) -> None:
        self.closed = True


async def test_a_probe_that_gets_no_proper_answer_says_no_answer(monkeypatch):
    region = SimpleNamespace(name="mumbai", port=1)
    broken = _BrokenConnection()

    async def connect_to_broken(**_: object) -> _BrokenConnection:
        return broken

    monkeypatch.setattr(asyncpg, "connect", connect_to_broken)
    assert await probe(region) is None  # not an exception that stops the orchestrator
    assert broken.terminated and not broken.closed

    async def connect_fails(**_: object) -> None:
        raise InternalClientError("protocol confused")

    monkeypatch.setattr(asyncpg, "connect", connect_fails)
    assert await probe(region) is None


def test_configured_standbys_counts_the_names_synchronous_standby_names_lists():
    from dr.status import configured_standbys

    assert configured_standbys("ANY 1 (hyderabad, chennai)") == 2
    assert configured_standbys("FIRST 1 (a,b,c)") == 3
    assert configured_standbys("a, b") == 2
    assert configured_standbys("*") == 1
    assert configured_standbys("") == 0
    assert configured_standbys(None) == 0

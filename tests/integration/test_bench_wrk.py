"""wrk with `api/wrk/payments.lua`, the bench's closed loop: every payment of the file
exactly once, with its own key, and what was not a 202 is not counted as accepted."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil

import pytest

import api.bench
from api.bench import drive_wrk, write_requests
from api.loadgen import traffic

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)"
)


class Recorder:
    """An HTTP/1.1 server that keeps what it was sent; it refuses the order ids in
    ``refuse`` with a 422 (whose body, like the engine's errors, names no order id)."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.received: list[tuple[dict[str, str], dict[str, object]]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                lines = head.split("\r\n")
                headers = {
                    k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)
                }
                headers["request-line"] = lines[0]
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                self.received.append((headers, body))
                await asyncio.sleep(0.002)
                order = str(body["merchant_order_id"])
                if order in self.refuse:
                    status, answer = "422 Unprocessable Entity", b'{"error":"nope"}'
                else:
                    answer = json.dumps({"status": "INITIATED", "merchant_order_id": order})
                    status, answer = "202 Accepted", answer.encode()
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(answer)}\r\n\r\n".encode() + answer
                )


@pytest.mark.parametrize("threads", [1, 2])
async def test_every_payment_is_sent_exactly_once_and_refusals_are_counted(
    tmp_path, monkeypatch, threads
):
    monkeypatch.setattr(api.bench, "_WRK_THREADS", threads)
    bodies = list(itertools.islice(traffic(5, "wrk"), 301))  # not a multiple of the threads
    requests = tmp_path / "requests.tsv"
    write_requests(requests, bodies)
    refuse = {str(bodies[7]["merchant_order_id"]), str(bodies[200]["merchant_order_id"])}
    recorder = Recorder(refuse)
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        wrk = shutil.which("wrk")
        assert wrk is not None
        sent = await drive_wrk(wrk, f"http://127.0.0.1:{port}", "k3y", requests, 301, 8)
    # Exactly the file: each payment once, its key its order id, its own payer.
    keys = [h["idempotency-key"] for h, _ in recorder.received]
    assert sorted(keys) == sorted(str(b["merchant_order_id"]) for b in bodies)
    assert all(h["idempotency-key"] == b["merchant_order_id"] for h, b in recorder.received)
    assert len({b["payer_vpa"] for _, b in recorder.received}) == 301
    assert {h["request-line"] for h, _ in recorder.received} == {"POST /v1/payments HTTP/1.1"}
    assert {h["authorization"] for h, _ in recorder.received} == {"Bearer k3y"}
    assert {h["content-type"] for h, _ in recorder.received} == {"application/json"}
    # Two refused: sent, answered, not accepted.
    assert sent.sent == 301 and sent.accepted == 299
    assert sent.statuses == {"202": 299, "422": 2} and sent.errors == {}
    assert 2 <= sent.latency_p50_ms <= sent.latency_p99_ms < 5_000
    assert 0 < sent.seconds < 30 and 0 < sent.cpu_share < 1


async def test_a_run_shorter_than_wrks_start_up_ends_at_once(tmp_path):
    # One payment on a fast server can be answered before wrk listens for SIGINT.
    requests = tmp_path / "requests.tsv"
    write_requests(requests, itertools.islice(traffic(5, "one"), 1))
    recorder = Recorder(set())
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        wrk = shutil.which("wrk")
        assert wrk is not None
        began = asyncio.get_running_loop().time()
        sent = await drive_wrk(wrk, f"http://127.0.0.1:{port}", "k", requests, 1, 4)
        assert asyncio.get_running_loop().time() - began < 10
    assert sent.sent == sent.accepted == len(recorder.received) == 1

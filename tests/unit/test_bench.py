"""The pieces of `upi-engine bench` that are arithmetic: wrk's report, the open loop's
schedule and latency correction, the CPU and statement accounting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from api.bench import (
    BenchError,
    Usage,
    cpu_of,
    parse_wrk_output,
    tree_cpu_seconds,
    write_requests,
    wrk_sending,
)
from api.bench_client import (
    encode_requests,
    intended_offsets,
    read_requests,
    run,
    scheduled_count,
    summarize,
)

WRK_STDOUT = """Running 2m test @ http://127.0.0.1:40111
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   210.11ms  101.54ms   1.20s    72.35%
    Req/Sec   160.62     40.12   252.00     70.00%
  3000 requests in 19.87s, 1.01MB read
Requests/sec:    150.98
Transfer/sec:     52.11KB
{"requests":3001,"issued":3000,"answered":2998,"unpaired":0,"statuses":{"202":2996,"422":2},\
"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":0},\
"first_send_us":1000000000,"last_answer_us":1020000000,"latency_count":2996,\
"latency_ms":{"p50":190.5,"p90":320.25,"p99":801.0,"max":1200.0}}
"""


def test_parse_wrk_output_takes_the_scripts_json_line_after_wrks_report():
    parsed = parse_wrk_output(WRK_STDOUT)
    assert parsed["issued"] == 3000 and parsed["statuses"] == {"202": 2996, "422": 2}
    assert parsed["latency_ms"]["p99"] == 801.0
    with pytest.raises(BenchError, match="no result"):
        parse_wrk_output("Running 2m test @ http://x\nunable to connect\n")


def test_wrk_sending_counts_non_202_and_unanswered_requests_apart_from_the_accepted():
    sent = wrk_sending(parse_wrk_output(WRK_STDOUT), cpu_seconds=0.8, wall_s=20.0, cpus=2)
    assert sent.sent == 3000 and sent.accepted == 2996
    # Two refused, two never answered (a broken connection): not accepted, and said so.
    assert sent.statuses == {"202": 2996, "422": 2, "0": 2}
    assert sent.errors == {"read": 1}  # wrk's "status" count is in the statuses already
    assert "422" in sent.refused() and "read" in sent.refused()
    # Microseconds of CLOCK_MONOTONIC to seconds: 20 s from the first send to the last answer.
    assert sent.started == 1000.0 and sent.seconds == pytest.approx(20.0)
    assert sent.rate == pytest.approx(2996 / 20)
    assert (sent.latency_p50_ms, sent.latency_p99_ms) == (190.5, 801.0)
    assert sent.cpu_share == pytest.approx(0.8 / (20.0 * 2))


def test_wrk_sending_flags_202s_whose_latency_was_not_measured():
    parsed = parse_wrk_output(WRK_STDOUT)
    parsed["unpaired"] = 3
    assert wrk_sending(parsed, 0.1, 1.0, 2).errors["unpaired_202"] == 3


def test_the_open_loop_schedule_is_fixed_by_the_rate():
    assert scheduled_count(300, 20) == 6000
    assert scheduled_count(2.5, 1) == 3  # due at 0, 0.4 and 0.8 s
    assert scheduled_count(0.1, 1) == 1
    assert intended_offsets(4, 3) == [0.0, 0.25, 0.5]


def test_open_loop_latency_is_measured_from_the_intended_send_time():
    # A server that answers in 10 ms but holds one connection for 300 ms once: requests
    # due meanwhile leave late, and their latency counts from when they were due.
    raw = {
        "rate": 10.0,
        "due": [0.0, 0.1, 0.2, 0.3],
        "queued": [0.0, 0.1, 0.2, 0.32],  # the client was 20 ms late for the last one
        "sent": [0.0, 0.3, 0.31, 0.32],  # 1 and 2 waited for the connection
        "answered": [0.3, 0.31, 0.32, 0.33],
        "statuses": [202, 202, 202, 500],
        "errors": {},
        "connections": 1,
        "cpu_seconds": 0.02,
        "wall_seconds": 0.5,
        "cpu_count": 2,
    }
    s = summarize(raw)
    assert s["sent"] == 4 and s["accepted"] == 3 and s["statuses"] == {"202": 3, "500": 1}
    # Latencies from intended send times: 300, 210, 120 ms; the server's part: 300, 10, 10.
    assert s["latency_p50_ms"] == pytest.approx(210.0)
    assert s["service_p50_ms"] == pytest.approx(10.0)
    assert s["schedule_lag_p99_ms"] == pytest.approx(19.4)  # of 0, 0, 0, 20 ms
    assert s["connection_wait_p99_ms"] == pytest.approx(197.3)  # of 0, 0, 110, 200 ms
    assert s["seconds"] == pytest.approx(0.33) and s["achieved_rate"] == pytest.approx(3 / 0.33)
    assert s["offered_rate"] == 10.0 and s["cpu_share"] == pytest.approx(0.02 / (0.5 * 2))


def test_usage_per_payment():
    before = Usage(
        engine_cpu_s=10.0,
        postgres_cpu_s=4.0,
        monitor_cpu_s=0.5,
        statements=3,
        transaction_control=1,
        transactions=500,
        monitor_statements=4,
    )
    after = Usage(
        engine_cpu_s=25.0,  # 15 s of the engine
        postgres_cpu_s=12.0,  # 8 s of PostgreSQL, of which 1 s served the bench itself
        monitor_cpu_s=1.5,
        statements=50_003,  # 50,000 statements, 20,000 of them BEGIN/COMMIT/ROLLBACK
        transaction_control=20_001,
        transactions=10_700,  # 10,200 transactions, of which 200 were the bench's queries
        monitor_statements=204,
    )
    assert after.cost(before, 1000) == {
        "cpu_ms_per_payment": 22.0,
        "engine_cpu_ms_per_payment": 15.0,
        "postgres_cpu_ms_per_payment": 7.0,
        "statements_per_payment": 50.0,
        "statements_per_payment_without_begin_commit": 30.0,
        "transactions_per_payment": 10.0,
    }


def test_cpu_of_counts_the_children_a_process_has_waited_for():
    times = SimpleNamespace(user=1.0, system=0.5, children_user=2.0, children_system=0.25)
    assert cpu_of(times) == 3.75


def test_tree_cpu_seconds_keeps_the_cpu_of_a_child_that_exited():
    before = tree_cpu_seconds([os.getpid()])
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)  # runs, exits, is reaped
    after = tree_cpu_seconds([os.getpid()])
    assert after - before >= 0.3
    assert tree_cpu_seconds([2**22 + 12345]) == 0.0  # no such process: nothing


def test_request_files_round_trip_and_encode_to_valid_http(tmp_path):
    bodies = [
        {"payer_vpa": f"p{i}@okhdfc", "amount_paise": 100 + i, "merchant_order_id": f"o-{i}"}
        for i in range(3)
    ]
    path = tmp_path / "requests.tsv"
    assert write_requests(path, bodies) == 3
    pairs = read_requests(path)
    assert [k for k, _ in pairs] == ["o-0", "o-1", "o-2"]
    assert [json.loads(b) for _, b in pairs] == bodies
    [first, *_] = encode_requests("127.0.0.1", 8000, "key", pairs)
    head, body = first.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/payments HTTP/1.1\r\n")
    assert b"\r\nIdempotency-Key: o-0\r\n" in head and b"Authorization: Bearer key" in head
    assert f"Content-Length: {len(body)}".encode() in head
    with pytest.raises(ValueError, match="tabs"):
        write_requests(path, [{"merchant_order_id": "a\tb"}])


async def _slow_server(hold_s: float) -> tuple[asyncio.Server, int, list[float]]:
    """HTTP/1.1 that answers 202 after ``hold_s``; records when each request arrived."""
    arrivals: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                arrivals.append(time.monotonic())
                await asyncio.sleep(hold_s)
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], arrivals


async def test_the_open_loop_client_keeps_its_schedule_when_the_server_is_slow():
    # One connection, a server that takes 50 ms, 40 requests offered a second: the
    # requests queue in the client, and their latency from intended send time grows
    # while each one's service time stays ~50 ms (what a closed loop would report).
    server, port, arrivals = await _slow_server(0.05)
    async with server:
        pairs = [(f"o-{i}", b"{}") for i in range(10)]
        requests = encode_requests("127.0.0.1", port, "key", pairs)
        raw = await run("127.0.0.1", port, requests, rate=40.0, connections=1)
    s = summarize(raw)
    assert s["accepted"] == 10 and len(arrivals) == 10
    assert 45 <= s["service_p50_ms"] < 150
    # Request i is due at 25 i ms and answered at about 50 (i + 1) ms: the last waited ~275.
    assert s["latency_p99_ms"] > 200 > s["service_p99_ms"]
    assert 0 < s["cpu_share"] < 1 and raw["start_monotonic"] > 0


async def test_the_open_loop_client_opens_connections_while_all_are_busy():
    # The same slow server and rate, but customers may bring their own connection: no one
    # waits for another's, so latencies from intended send times stay near the service time.
    server, port, arrivals = await _slow_server(0.05)
    async with server:
        pairs = [(f"o-{i}", b"{}") for i in range(10)]
        requests = encode_requests("127.0.0.1", port, "key", pairs)
        raw = await run("127.0.0.1", port, requests, rate=40.0, connections=1, max_connections=8)
    s = summarize(raw)
    assert s["accepted"] == len(arrivals) == 10 and 2 <= s["connections"] <= 8
    assert s["latency_p99_ms"] < 200 and s["connection_wait_p99_ms"] < 50

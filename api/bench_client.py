"""The open-loop client of ``upi-engine bench --rate R --duration S`` (SPEC §9).

Payments arrive at a fixed offered rate whatever the server does, as customers do: request
``i`` is due ``i / R`` seconds after the start, and its latency is measured from that
intended send time, not from when it could be sent (wrk2's correction of coordinated
omission). A request that finds every connection busy gets a new one, as a new customer
would (its connect time in its latency), up to ``max_connections``; past that it waits for
one, and that wait is in its latency too. A server that falls behind sees its latencies
grow instead of the client slowing down to its pace.

It is cheap on purpose, so that it measures the server rather than itself: its own
process (``python -m api.bench_client``, started by the bench), an asyncio loop (uvloop
when installed) with raw HTTP/1.1 over keep-alive connections, the first ones opened
before the start, every request encoded before the start, nothing parsed in an answer but
its status line and ``Content-Length``. It reports its own CPU time over the run, for the
bench's ``client_cpu_share``, and the raw times of every request; the bench turns them
into percentiles (:func:`summarize`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "encode_requests",
    "intended_offsets",
    "read_requests",
    "run",
    "scheduled_count",
    "summarize",
]

_LEAD_S = 0.05  # the schedule starts this long after the connections are open


def scheduled_count(rate: float, duration_s: float) -> int:
    """How many requests ``duration_s`` at ``rate`` offers: every ``i`` with
    ``i / rate < duration_s`` (at least one)."""
    return max(1, math.ceil(rate * duration_s - 1e-9))


def intended_offsets(rate: float, count: int) -> list[float]:
    """When each request is due, in seconds from the start: request ``i`` at ``i / rate``."""
    return [i / rate for i in range(count)]


def read_requests(path: Path) -> list[tuple[str, bytes]]:
    """The bench's request file: ``merchant_order_id<TAB>JSON body`` a line."""
    pairs = []
    for line in path.read_bytes().splitlines():
        order_id, body = line.split(b"\t", 1)
        pairs.append((order_id.decode(), body))
    return pairs


def encode_requests(
    host: str, port: int, api_key: str, pairs: Sequence[tuple[str, bytes]]
) -> list[bytes]:
    """``POST /v1/payments`` as bytes on the wire, the order id as ``Idempotency-Key``."""
    head = (
        f"POST /v1/payments HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
    ).encode()
    return [
        head + f"Idempotency-Key: {order_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        for order_id, body in pairs
    ]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """One request and its answer: (status, the server keeps the connection open)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("answer without Content-Length")  # chunked: not from this server
    end = lower.index(b"\r\n", at + 2)
    await reader.readexactly(int(lower[at + 17 : end]))
    return status, b"\r\nconnection: close" not in lower


async def run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    connections: int,
    *,
    max_connections: int = 0,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send ``requests[i]`` when it is due (``i / rate`` s after the start) on a free
    connection: ``connections`` opened before the start, a new one when all are busy, up
    to ``max_connections`` (at least ``connections``). Returns the raw times, in seconds
    from the
    start: each request's due time, when it was queued (when it was due, unless this
    client fell behind), when a connection took it and sent it, when its answer came, its
    status (0: no answer), and this process's CPU time over the run."""
    count = len(requests)
    due = intended_offsets(rate, count)
    queued = [0.0] * count
    sent = [0.0] * count
    answered = [0.0] * count
    statuses = [0] * count
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    pool = [await asyncio.open_connection(host, port) for _ in range(connections)]
    errors: Counter[str] = Counter()
    most = max(connections, max_connections)
    idle = 0  # connections waiting for a request

    cpu_began = time.process_time()
    start = time.monotonic() + _LEAD_S

    async def connection(
        stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> None:
        nonlocal idle
        while True:
            idle += 1
            i = await queue.get()
            idle -= 1
            if i is None:
                break
            sent[i] = time.monotonic() - start
            keep = False
            try:
                async with asyncio.timeout(timeout_s):
                    if stream is None:  # opened during the run, or broken: in the latency
                        stream = await asyncio.open_connection(host, port)
                    statuses[i], keep = await _exchange(*stream, requests[i])
            except (OSError, EOFError, TimeoutError, ValueError) as exc:
                errors[type(exc).__name__] += 1  # status 0: no answer, not retried
            answered[i] = time.monotonic() - start
            if not keep and stream is not None:
                stream[1].close()
                stream = None
        if stream is not None:
            stream[1].close()

    workers = [asyncio.create_task(connection(stream)) for stream in pool]
    for i in range(count):
        wait = start + due[i] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        queued[i] = time.monotonic() - start
        queue.put_nowait(i)
        if queue.qsize() > idle and len(workers) < most:  # every connection busy
            workers.append(asyncio.create_task(connection(None)))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu_began
    return {
        "rate": rate,
        "connections": len(workers),  # at the end: those opened before, and after
        "start_monotonic": start,  # request 0 was due then (time.monotonic())
        "due": due,
        "queued": queued,
        "sent": sent,
        "answered": answered,
        "statuses": statuses,
        "errors": dict(errors),
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cpu_count": os.cpu_count() or 1,
    }


def _percentile(values: Sequence[float], q: float) -> float:
    # Imported here: summarize() runs in the bench, and the client's process stays light.
    from api.loadgen import percentile

    return percentile(values, q)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Rates, latencies (ms) and the client's CPU share from :func:`run`'s raw times.

    ``latency_*``: answer - due, the latency a customer arriving on schedule saw (waits for
    a free connection included); ``service_*``: answer - sent, the server's part alone;
    ``schedule_lag_p99_ms``: queued - due, how far this client fell behind its schedule
    (large: the client is the bottleneck); ``connection_wait_p99_ms``: sent - queued, the
    waits for a free connection (large: the server is behind and every connection is
    taken). ``achieved_rate``: 202s over
    the time from the start to the last answer."""
    due, queued, sent, answered = raw["due"], raw["queued"], raw["sent"], raw["answered"]
    statuses = Counter(raw["statuses"])
    accepted = [i for i, s in enumerate(raw["statuses"]) if s == 202]
    latency = [(answered[i] - due[i]) * 1000 for i in accepted]
    service = [(answered[i] - sent[i]) * 1000 for i in accepted]
    lag = [(queued[i] - due[i]) * 1000 for i in range(len(due))]
    waits = [(sent[i] - queued[i]) * 1000 for i in range(len(due))]
    last = max(answered, default=0.0)
    wall = raw["wall_seconds"]
    return {
        "offered_rate": raw["rate"],
        "sent": len(due),
        "accepted": len(accepted),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": raw["errors"],
        "seconds": last,
        "achieved_rate": len(accepted) / last if last > 0 else 0.0,
        "latency_p50_ms": _percentile(latency, 0.5),
        "latency_p99_ms": _percentile(latency, 0.99),
        "service_p50_ms": _percentile(service, 0.5),
        "service_p99_ms": _percentile(service, 0.99),
        "schedule_lag_p99_ms": _percentile(lag, 0.99),
        "connection_wait_p99_ms": _percentile(waits, 0.99),
        "connections": raw["connections"],
        "cpu_seconds": raw["cpu_seconds"],
        "cpu_share": raw["cpu_seconds"] / (wall * raw["cpu_count"]) if wall > 0 else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api.bench_client", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--requests", type=Path, required=True, help="order id<TAB>body lines")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--connections", type=int, default=32, help="opened before the start")
    parser.add_argument("--max-connections", type=int, default=1000, help="opened at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per answer")
    parser.add_argument("--out", type=Path, help="write the raw times here, not on stdout")
    args = parser.parse_args(argv)
    requests = encode_requests(args.host, args.port, args.api_key, read_requests(args.requests))
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    raw = runner(
        run(
            args.host,
            args.port,
            requests,
            args.rate,
            args.connections,
            max_connections=args.max_connections,
            timeout_s=args.timeout,
        )
    )
    if args.out is None:
        sys.stdout.buffer.write(orjson.dumps(raw) + b"\n")
    else:
        args.out.write_bytes(orjson.dumps(raw))


if __name__ == "__main__":
    main()

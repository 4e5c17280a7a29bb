"""Realistic payment traffic, for ``upi-engine load`` and ``upi-engine bench``.

The payments are the fraud simulator's ordinary customers (``fraud.simulator``): their
VPAs, amounts (₹1 tea to a month's rent), phones and the places they pay from, one payment
per payer so that a run measures the engine rather than the payer limits and velocity
rules. ``upi-engine load`` sends them as a merchant client behaves as the merchant guide
asks: each payment has its own idempotency key, a 429 or a 503 waits for its
``Retry-After``, another 5xx or a broken connection is retried with backoff, always with
the same key. (``upi-engine bench`` sends them with
clients that cost less and retry nothing: ``api.bench``.)
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from fraud.simulator import simulate

__all__ = ["MAX_IN_FLIGHT", "Sent", "drive_at_rate", "percentile", "traffic"]

_RETRIES = 5  # broken connections and 5xx other than 503, with backoff
_UNAVAILABLE_WAITS = 60  # 429s and 503s, each waited out for its Retry-After
MAX_IN_FLIGHT = 512


def traffic(seed: int, run: str) -> Iterator[dict[str, Any]]:
    """Payment requests without end: the first ordinary payment of each simulated payer,
    in batches of simulated customers; ``run`` keeps order ids apart between runs."""
    batch = 0
    n = 0
    while True:
        seen: set[str] = set()
        phones: set[str] = set()
        for labelled in simulate(seed + batch, payers=2_000, days=1.0, scale=0.01):
            txn = labelled.txn
            if labelled.fraud or txn.payer in seen or (txn.device_id in phones):
                # One payment per payer, one payer per phone: the simulator's families
                # share a phone, and the load would look like a device farm to fraud.
                continue
            seen.add(txn.payer)
            if txn.device_id is not None:
                phones.add(txn.device_id)
            body: dict[str, Any] = {
                # The same customers come back in the next batch, with other names and phones.
                "payer_vpa": txn.payer.replace("@", f".{batch}@") if batch else txn.payer,
                "amount_paise": txn.amount_paise,
                "merchant_order_id": f"{run}-{n}",
            }
            if txn.device_id is not None:
                device_id = f"{txn.device_id}.{batch}" if batch else txn.device_id
                device: dict[str, Any] = {"id": device_id, "rooted": txn.rooted}
                if txn.location is not None:
                    device["latitude"], device["longitude"] = txn.location
                body["device"] = device
            n += 1
            yield body
        batch += 1


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    at = (len(ordered) - 1) * q
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


@dataclass
class Sent:
    """What a run sent and got back."""

    accepted: dict[str, float] = field(default_factory=dict)  # transaction id -> latency ms
    statuses: Counter[int] = field(default_factory=Counter)  # last answer per payment, 0: none
    throttled: int = 0  # 429s waited out
    unavailable: int = 0  # 503s (a dependency down) waited out
    held_back: int = 0  # times a send waited because max_in_flight payments were open
    errors: int = 0  # connections broken or 5xx, retried
    started: float = field(default_factory=time.perf_counter)
    finished: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def summary(self) -> dict[str, Any]:
        latencies = list(self.accepted.values())
        return {
            "sent": self.sent,
            "accepted": len(self.accepted),
            "rejected": {str(k): v for k, v in sorted(self.statuses.items()) if k not in (0, 202)},
            "unanswered": self.statuses[0],  # no answer after every retry
            "throttled": self.throttled,
            "unavailable": self.unavailable,
            "held_back": self.held_back,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "accepted_per_second": round(len(self.accepted) / self.seconds, 1),
            "latency_p50_ms": round(percentile(latencies, 0.5), 2),
            "latency_p99_ms": round(percentile(latencies, 0.99), 2),
        }


def _retry_after(header: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` (seconds; an HTTP date or nothing: 1 s)."""
    try:
        return min(max(float(header or "1"), 0.0), 60.0)
    except ValueError:
        return 1.0


async def _send(
    client: httpx.AsyncClient, api_key: str, body: dict[str, Any], sent: Sent, path: str
) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": body["merchant_order_id"]}
    status = 0
    failures = waits = 0
    while failures < _RETRIES and waits < _UNAVAILABLE_WAITS:
        began = time.perf_counter()
        try:
            response = await client.post(path, json=body, headers=headers)
        except httpx.HTTPError:
            sent.errors += 1
            await asyncio.sleep(0.1 * 2**failures)
            failures += 1
            continue
        status = response.status_code
        if status in (429, 503):  # throttled, or a dependency down: as long as it says
            waits += 1
            if status == 429:
                sent.throttled += 1
            else:
                sent.unavailable += 1
            await asyncio.sleep(_retry_after(response.headers.get("Retry-After")))
            continue
        if status >= 500:
            sent.errors += 1
            await asyncio.sleep(0.1 * 2**failures)
            failures += 1
            continue
        if status == 202:
            latency = (time.perf_counter() - began) * 1000
            sent.accepted[response.json()["transaction_id"]] = latency
        break
    sent.statuses[status] += 1


async def drive_at_rate(
    url: str,
    api_key: str,
    bodies: Iterator[dict[str, Any]],
    rate: float,
    duration_s: float,
    *,
    on_sent: Callable[[], None] | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> Sent:
    """A new payment every 1/``rate`` seconds for ``duration_s``, however long answers take
    (an open loop, as real customers arrive); waits for the last answers.

    At most ``max_in_flight`` payments are open at once (retries and waits for
    ``Retry-After`` included): past that the next ones wait, the run sends fewer than
    ``rate x duration_s`` and says so (``accepted_per_second``, ``held_back``). Unbounded,
    a client facing an engine that is slower than the offered rate (or down) piles up
    tens of thousands of requests on one connection pool, whose scheduling then takes all
    its CPU: it measured itself, not the engine."""
    # Made before the clock starts: a batch of simulated customers takes seconds to
    # generate, which inside the loop would hold back the sends it should pace.
    planned = list(itertools.islice(bodies, math.ceil(rate * duration_s)))
    ahead = iter(planned)
    sent = Sent()
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=min(max_in_flight, 256))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(body: dict[str, Any]) -> None:
            await _send(client, api_key, body, sent, "/v1/payments")
            if on_sent is not None:
                on_sent()

        n = 0
        while (elapsed := time.perf_counter() - sent.started) < duration_s:
            if elapsed * rate >= n:
                if len(tasks) >= max_in_flight:
                    sent.held_back += 1
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                body = next(ahead, None)
                if body is None:
                    break
                task = asyncio.create_task(one(body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                continue
            await asyncio.sleep(min(1 / rate, duration_s - elapsed))
        if tasks:
            await asyncio.gather(*tasks)
    sent.finished = time.perf_counter()
    return sent

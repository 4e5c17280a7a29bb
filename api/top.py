"""``upi-engine top``: a live view of running engines, from their ``/metrics`` (SPEC §10).

Each engine is scraped twice ``interval`` seconds apart; counters and histograms become
rates and latencies over that window (the way Prometheus's ``rate()`` and
``histogram_quantile()`` read them), gauges are shown as they are. :func:`summarize` is
the arithmetic, pure; :func:`scrape` and the CLI do the I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Snapshot", "scrape", "summarize"]

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Snapshot:
    """One scrape: every sample by metric sample name and labels, and when."""

    at: float
    samples: Mapping[str, Mapping[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Snapshot:
        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted(s.labels.items()))
                samples.setdefault(s.name, {})[labels] = float(s.value)
        return cls(at, samples)

    def series(self, name: str, **match: str) -> dict[Labels, float]:
        return {
            labels: value
            for labels, value in self.samples.get(name, {}).items()
            if all(dict(labels).get(k) == v for k, v in match.items())
        }

    def total(self, name: str, **match: str) -> float:
        return sum(self.series(name, **match).values())

    def gauge(self, name: str) -> float | None:
        found = self.samples.get(name)
        return sum(found.values()) if found else None


async def scrape(client: httpx.AsyncClient, url: str) -> Snapshot:
    response = await client.get(f"{url.rstrip('/')}/metrics")
    response.raise_for_status()
    return Snapshot.parse(response.text, time.monotonic())


def _rate(before: Snapshot, after: Snapshot, name: str, **match: str) -> float:
    seconds = max(after.at - before.at, 1e-9)
    # A counter that went down (the process restarted) counts from zero.
    delta = after.total(name, **match) - before.total(name, **match)
    return max(delta if delta >= 0 else after.total(name, **match), 0.0) / seconds


def _quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: ``buckets`` as (upper bound, cumulative count)."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def _latency_ms(
    before: Snapshot, after: Snapshot, name: str, q: float, **match: str
) -> float | None:
    """The q-quantile of a histogram's observations between the two scrapes, in ms."""
    by_bound: dict[float, float] = {}
    for labels, value in after.series(f"{name}_bucket", **match).items():
        bound = float(dict(labels)["le"])
        earlier = before.samples.get(f"{name}_bucket", {}).get(labels, 0.0)
        by_bound[bound] = by_bound.get(bound, 0.0) + max(value - earlier, 0.0)
    found = _quantile(q, by_bound.items())
    return None if found is None else round(found * 1000, 1)


def _by(snapshot: Snapshot, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in snapshot.series(name).items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def summarize(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What an operator looks at first, over the window between two scrapes."""
    primary = after.gauge("upi_database_primary")
    five_xx = sum(
        _rate(before, after, "upi_http_request_seconds_count", status=status)
        for status in {dict(labels).get("status", "") for labels in after.series(
            "upi_http_request_seconds_count")}
        if status.startswith("5")
    )  # fmt: skip
    return {
        "window_s": round(after.at - before.at, 2),
        "accepted_per_s": round(_rate(before, after, "upi_payments_initiated_total"), 1),
        "final_per_s": {
            status: round(_rate(before, after, "upi_payments_final_total", status=status), 1)
            for status in sorted(_by(after, "upi_payments_final_total", "status"))
        },
        "http_5xx_per_s": round(five_xx, 2),
        "accepted_p50_ms": _latency_ms(
            before, after, "upi_http_request_seconds", 0.5, route="/v1/payments", status="202"
        ),
        "accepted_p99_ms": _latency_ms(
            before, after, "upi_http_request_seconds", 0.99, route="/v1/payments", status="202"
        ),
        "fraud_p99_ms": _latency_ms(before, after, "upi_fraud_scoring_seconds", 0.99),
        "consumer_lag": {
            k: int(v) for k, v in sorted(_by(after, "upi_consumer_lag", "consumer").items())
        },
        "dead_letters": {
            k: int(v) for k, v in sorted(_by(after, "upi_dead_letters_total", "consumer").items())
        },
        "outbox_backlog": _int(after.gauge("upi_outbox_backlog")),
        "deemed_payments": _int(after.gauge("upi_deemed_payments")),
        "ledger_size": _int(after.gauge("upi_ledger_size")),
        "ledger_checkpoint_age_s": after.gauge("upi_ledger_checkpoint_age_seconds"),
        "ledger_valid": None if (v := after.gauge("upi_ledger_valid")) is None else v == 1,
        "witness_lag": {
            k: int(v) for k, v in sorted(_by(after, "upi_ledger_witness_lag", "witness").items())
        },
        "database_role": None if primary is None else ("primary" if primary else "standby"),
        "dr_standbys": None
        if after.gauge("upi_dr_standbys_configured") in (None, 0)
        else f"{_int(after.gauge('upi_dr_standbys_streaming'))}"
        f"/{_int(after.gauge('upi_dr_standbys_configured'))} streaming",
    }


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)

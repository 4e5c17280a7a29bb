"""`upi-engine top`'s arithmetic (api/top.py): rates, latencies from histogram buckets and
gauges between two scrapes of /metrics. Pure."""

from __future__ import annotations

import pytest

from api.top import Snapshot, _quantile, summarize


def _text(initiated: float, ok: float, buckets: tuple[float, float, float], **gauges: float) -> str:
    lines = [
        "# TYPE upi_payments_initiated_total counter",
        f"upi_payments_initiated_total {initiated}",
        "# TYPE upi_payments_final_total counter",
        f'upi_payments_final_total{{status="SUCCESS"}} {ok}',
        f'upi_payments_final_total{{status="FAILED"}} {ok / 10}',
        "# TYPE upi_http_request_seconds histogram",
    ]
    route = 'method="POST",route="/v1/payments",status="202"'
    for le, count in zip(("0.01", "0.1", "+Inf"), buckets, strict=True):
        lines.append(f'upi_http_request_seconds_bucket{{{route},le="{le}"}} {count}')
    lines += [
        f"upi_http_request_seconds_count{{{route}}} {buckets[-1]}",
        f"upi_http_request_seconds_sum{{{route}}} 1.0",
        'upi_http_request_seconds_count{method="POST",route="/v1/payments",status="503"} '
        f"{gauges.pop('unavailable', 0)}",
        "# TYPE upi_consumer_lag gauge",
        f'upi_consumer_lag{{consumer="ledger"}} {gauges.pop("lag", 0)}',
        'upi_consumer_lag{consumer="fraud"} 0',
    ]
    for name, value in gauges.items():
        lines += [f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def test_rates_latencies_and_gauges_over_the_window():
    before = Snapshot.parse(_text(100, 90, (50, 90, 100)), at=10.0)
    after = Snapshot.parse(
        _text(
            300,
            290,
            (130, 270, 300),  # of the 200 new: 80 under 10 ms, 180 under 100 ms, all 200
            unavailable=20,
            lag=42,
            upi_deemed_payments=3,
            upi_ledger_size=1234,
            upi_ledger_valid=1,
            upi_database_primary=1,
            upi_dr_standbys_configured=2,
            upi_dr_standbys_streaming=1,
        ),
        at=12.0,
    )
    got = summarize(before, after)
    assert got["accepted_per_s"] == 100.0
    assert got["final_per_s"] == {"FAILED": 10.0, "SUCCESS": 100.0}
    assert got["http_5xx_per_s"] == 10.0
    # p50: rank 100 of 200, in the (10 ms, 100 ms] bucket holding ranks 81..180.
    assert got["accepted_p50_ms"] == pytest.approx(10 + 90 * (100 - 80) / 100, abs=0.1)
    assert got["accepted_p99_ms"] == 100.0  # rank 198, in (100 ms, +Inf]: the last bound
    assert got["consumer_lag"] == {"fraud": 0, "ledger": 42}
    assert got["deemed_payments"] == 3 and got["ledger_size"] == 1234
    assert got["ledger_valid"] is True and got["database_role"] == "primary"
    assert got["dr_standbys"] == "1/2 streaming"


def test_a_restarted_process_counts_from_zero_and_missing_metrics_are_none():
    before = Snapshot.parse(_text(1000, 900, (500, 900, 1000)), at=0.0)
    after = Snapshot.parse(_text(40, 30, (10, 30, 40), upi_database_primary=0), at=4.0)
    got = summarize(before, after)
    assert got["accepted_per_s"] == 10.0  # 40 since the restart, not -960
    assert got["database_role"] == "standby" and got["ledger_size"] is None
    assert got["dr_standbys"] is None and got["ledger_valid"] is None


def test_quantile_edges():
    assert _quantile(0.5, []) is None
    assert _quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert _quantile(0.5, [(0.1, 10.0), (float("inf"), 10.0)]) == pytest.approx(0.05)

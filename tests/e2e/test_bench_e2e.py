"""`upi-engine bench` (SPEC §9) and `upi-engine load` (SPEC §3) as users run them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from core.config import auto_gateway_processes
from tests.e2e.harness import UPI_ENGINE, base_env, cli, create_merchant, query, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC_KEYS = {
    "payments",
    "seconds",
    "payments_per_second",
    "initiation_p50_ms",
    "initiation_p99_ms",
    "final_p50_ms",
    "final_p99_ms",
    "ledger_entries_per_second",
    "fraud_p99_ms",
    "client_cpu_share",
    "cpu_ms_per_payment",
    "statements_per_payment",
}
needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)"
)


def check_bench(result: dict, payments: int) -> None:
    assert result.keys() >= SPEC_KEYS
    assert result["payments"] == result["sent"] == result["accepted"] == payments
    assert sum(result["statuses"].values()) == payments
    final = sum(n for s, n in result["statuses"].items() if s != "PENDING_VERIFICATION")
    assert final >= payments * 0.9, result["statuses"]  # a few may be stepped up
    # Every payment has at least initiated, assessed and a final event in the ledger.
    assert result["ledger_entries"] >= 3 * final
    for key in SPEC_KEYS - {"payments"}:
        assert result[key] > 0, key
    assert result["initiation_p50_ms"] <= result["initiation_p99_ms"]
    assert result["final_p50_ms"] <= result["final_p99_ms"]
    assert result["initiation_p50_ms"] < result["final_p50_ms"]
    base, ratios = result["baselines"], result["ratios"]
    assert base["bare_fastapi_requests_per_second"] > 0
    assert base["bare_postgres_inserts_per_second"] > 0
    assert ratios["payments_per_second_vs_bare_inserts"] == pytest.approx(
        result["payments_per_second"] / base["bare_postgres_inserts_per_second"], abs=0.002
    )
    assert ratios["payments_per_second_vs_bare_fastapi"] == pytest.approx(
        # The rates are printed rounded to 0.1/s (0.4 % at a few dozen a second) and the
        # ratio to three decimals (up to 0.0005, which is more than 1 % of a ratio of 0.04).
        result["payments_per_second"] / base["bare_fastapi_requests_per_second"],
        rel=0.01,
        abs=0.0006,
    )
    # What it cost: the client a small share of the machine, the engine and PostgreSQL
    # some CPU, statements (BEGIN/COMMIT among them) and transactions for every payment.
    assert 0 < result["client_cpu_share"] < 0.5
    assert 0 < base["bare_fastapi_client_cpu_share"] < 0.5
    assert 0 < result["engine_cpu_ms_per_payment"] < result["cpu_ms_per_payment"]
    assert 0 < result["postgres_cpu_ms_per_payment"] < result["cpu_ms_per_payment"]
    assert result["transactions_per_payment"] > 0
    assert result["statements_per_payment_without_begin_commit"] > 0
    assert result["statements_per_payment"] > result["transactions_per_payment"]
    assert result["top_statements"] and result["top_statements"][0]["per_payment"] > 0


@needs_wrk
def test_bench_closed_loop_on_the_embedded_default(tmp_path):
    # Run where a .env names another database: the bench's own engine must not use it.
    (tmp_path / ".env").write_text("UPI_DATABASE_URL=postgresql+asyncpg://x@127.0.0.1:1/nope\n")
    done = subprocess.run(
        [UPI_ENGINE, "bench", "--payments", "50", "--concurrency", "8", "--json"],
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_bench(result, 50)
    # The engine's default: UPI_GATEWAY_PROCESSES=auto, whatever the bench's environment says.
    expected = ("memory", auto_gateway_processes(), "closed")
    assert (result["bus"], result["processes"], result["loop"]) == expected
    assert result["client"].startswith("wrk")
    assert 0 < result["settled_per_second"] <= result["payments_per_second"]


def test_bench_open_loop_measures_from_intended_send_times():
    # With --traces 1: the engine once more, every process tracing to the bench's sink.
    args = ["--rate", "25", "--duration", "2", "--traces", "1", "--trace-sample-ratio", "1"]
    done = cli(base_env(), "bench", *args, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_bench(result, 50)
    assert result["loop"] == "open" and result["client"].startswith("api.bench_client")
    assert result["offered_rate"] == 25 and 0 < result["achieved_rate"] <= 26
    # From the intended send time, so never less than the server's own part.
    assert result["initiation_p50_ms"] >= result["service_p50_ms"] > 0
    assert result["schedule_lag_p99_ms"] >= 0 and result["connection_wait_p99_ms"] >= 0
    # Traces off (the run above) against on, in the same run: every payment's spans reached
    # the sink (12 for a payment that succeeds, fewer for one blocked or declined, one more
    # when an event is delivered again).
    traces = result["traces"]
    [pair] = traces["rounds"]
    assert traces["sample_ratio"] == 1 and pair["sink_refused"] == 0
    assert pair["off_settled_per_second"] == result["settled_per_second"]
    assert pair["on_settled_per_second"] > 0 and traces["settled_on_vs_off"] > 0
    assert 8 <= pair["spans_per_payment"] <= 12.5, pair


def test_bench_over_kafka_with_the_gateway_and_the_workers_apart(kafka_bootstrap):
    env = base_env(UPI_KAFKA_BOOTSTRAP=kafka_bootstrap, UPI_KAFKA_IDEMPOTENCE="false")
    args = ["--rate", "15", "--duration", "2", "--bus", "kafka", "--processes", "2"]
    done = cli(env, "bench", *args, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_bench(result, 30)
    assert (result["bus"], result["processes"]) == ("kafka", 2)


def test_bench_usage_errors_exit_2(tmp_path):
    done = cli(base_env(), "bench", "--bus", "kafka")
    assert done.returncode == 2 and "UPI_KAFKA_BOOTSTRAP" in done.stderr
    done = cli(base_env(), "bench", "--bus", "kafka", "--processes", "3")
    assert done.returncode == 2 and "gateway | workers" in done.stderr
    done = cli(base_env(), "bench", "--rate", "10")
    assert done.returncode == 2 and "--duration" in done.stderr
    done = cli(base_env(), "bench", "--payments", "10", "--rate", "10", "--duration", "1")
    assert done.returncode == 2 and "not both" in done.stderr
    # No wrk on the PATH: the closed loop says how to get it, in one line.
    done = cli(base_env(PATH=str(tmp_path)), "bench", "--payments", "10")
    assert done.returncode == 2 and done.stdout == ""
    assert "apt-get install wrk" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_load_sends_realistic_payments_to_a_running_engine(embedded_env):
    with serving(embedded_env, ("all",)) as (server,):
        merchant = create_merchant(embedded_env)
        args = ["--url", server.url, "--rate", "8", "--duration", "2", "--json"]
        done = cli(embedded_env, "load", "--api-key", merchant["api_key"], *args)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert 14 <= summary["sent"] <= 17 and summary["accepted"] == summary["sent"]
        assert summary["rejected"] == {} and summary["latency_p50_ms"] > 0
        [(payments, payers)] = query(
            embedded_env, "SELECT count(*), count(DISTINCT payer_key) FROM payments"
        )
        assert payments == payers == summary["accepted"]
        # A wrong key: every payment refused, and the command says so.
        done = cli(embedded_env, "load", "--api-key", "nope", *args)
        assert done.returncode == 1
        refused = json.loads(done.stdout)
        assert refused["accepted"] == 0 and refused["rejected"] == {"401": refused["sent"]}

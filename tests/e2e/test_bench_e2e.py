"""`upi-engine bench` (SPEC §9) and `upi-engine load` (SPEC §3) as users run them."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.harness import UPI_ENGINE, base_env, cli, create_merchant, query, serving

pytestmark = pytest.mark.e2e

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
}


def check_bench(result: dict, payments: int) -> None:
    assert result.keys() >= SPEC_KEYS
    assert result["payments"] == payments
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
        result["payments_per_second"] / base["bare_fastapi_requests_per_second"], abs=0.002
    )


def test_bench_on_the_embedded_default(tmp_path):
    # Run where a .env names another database: the bench's own engine must not use it.
    (tmp_path / ".env").write_text("UPI_DATABASE_URL=postgresql+asyncpg://x@127.0.0.1:1/nope\n")
    done = subprocess.run(
        [UPI_ENGINE, "bench", "--payments", "40", "--concurrency", "4", "--json"],
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_bench(result, 40)
    assert (result["bus"], result["processes"]) == ("memory", 1)
    assert 0 < result["settled_per_second"] <= result["payments_per_second"]


def test_bench_over_kafka_with_the_gateway_and_the_workers_apart(kafka_bootstrap):
    env = base_env(UPI_KAFKA_BOOTSTRAP=kafka_bootstrap, UPI_KAFKA_IDEMPOTENCE="false")
    args = ["--payments", "30", "--concurrency", "4", "--bus", "kafka", "--processes", "2"]
    done = cli(env, "bench", *args, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_bench(result, 30)
    assert (result["bus"], result["processes"]) == ("kafka", 2)


def test_bench_usage_errors_exit_2():
    done = cli(base_env(), "bench", "--bus", "kafka")
    assert done.returncode == 2 and "UPI_KAFKA_BOOTSTRAP" in done.stderr
    done = cli(base_env(), "bench", "--processes", "2")
    assert done.returncode == 2 and "--bus kafka" in done.stderr


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
            embedded_env, "SELECT count(*), count(DISTINCT payer_vpa) FROM payments"
        )
        assert payments == payers == summary["accepted"]
        # A wrong key: every payment refused, and the command says so.
        done = cli(embedded_env, "load", "--api-key", "nope", *args)
        assert done.returncode == 1
        refused = json.loads(done.stdout)
        assert refused["accepted"] == 0 and refused["rejected"] == {"401": refused["sent"]}

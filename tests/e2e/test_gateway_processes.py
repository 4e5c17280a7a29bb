"""``UPI_GATEWAY_PROCESSES``: ``serve`` on the embedded default answers HTTP from several
processes on one port, the first running every role; the others go when it goes. Their
``/metrics`` show the totals of all of them, and they share the merchants' rate limits."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import cli, create_merchant, query, serving, wait_final
from tests.e2e.test_shutdown import _no_postgres_left

pytestmark = pytest.mark.e2e
HANDLES = ("okhdfc", "oksbi", "okaxis", "okicici")


def _gateways(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if "--beside" in c.cmdline()]


def _listening(process: psutil.Process) -> bool:
    return any(c.status == psutil.CONN_LISTEN for c in process.net_connections(kind="tcp"))


def _started_gateways(pid: int, count: int) -> list[psutil.Process]:
    """The ``count`` extra gateway processes of ``serve``, once each listens: before that
    the kernel gives every new connection to the first process."""
    deadline = time.monotonic() + 60
    while len(gateways := _gateways(pid)) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(gateways) == count
    while not all(_listening(g) for g in gateways):
        assert time.monotonic() < deadline, "a gateway process never listened"
        time.sleep(0.1)
    return gateways


def _sample(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample of a text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    return 0.0


def _per_process(
    metrics_dir: Path, kind: str, name: str, labels: dict[str, str]
) -> dict[int, float]:
    """Each process's own value of a sample, from its file in the metrics directory."""
    found = {}
    for path in metrics_dir.glob(f"{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        found[pid] = sum(
            sample.value
            for family in MultiProcessCollector.merge([str(path)])
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )
    return found


def _post_payment(url: str, api_key: str, i: int) -> httpx.Response:
    """On a connection of its own: the kernel spreads connections over the processes."""
    return httpx.post(
        f"{url}/v1/payments",
        headers={"Authorization": f"Bearer {api_key}", "Idempotency-Key": f"k{i}"},
        json={
            "payer_vpa": f"success@{HANDLES[i % 4]}",  # under the day's 20 each
            "amount_paise": 100 + i,
            "merchant_order_id": f"o{i}",
        },
        timeout=10,
    )


def _gone(processes: list[psutil.Process], timeout: float = 20) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_extra_gateway_processes_serve_payments_and_stop_with_serve(embedded_env, stop):
    env = {**embedded_env, "UPI_GATEWAY_PROCESSES": "3"}
    with serving(env, ("all",)) as [serve]:
        assert serve.proc is not None
        deadline = time.monotonic() + 60
        while len(gateways := _gateways(serve.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(gateways) == 2
        merchant = create_merchant(env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        busy = {g.pid: g.cpu_times() for g in gateways}
        txns = []
        for i in range(40):  # a new connection each: the kernel spreads them over the three
            r = httpx.post(
                f"{serve.url}/v1/payments",
                headers={**headers, "Idempotency-Key": f"k{i}"},
                json={
                    "payer_vpa": f"success@{HANDLES[i % 4]}",  # under the day's 20 each
                    "amount_paise": 100 + i,
                    "merchant_order_id": f"o{i}",
                },
                timeout=10,
            )
            assert r.status_code == 202, r.text
            txns.append(r.json()["transaction_id"])
        with httpx.Client(base_url=serve.url, timeout=10) as client:
            for txn in txns:  # written by any process, relayed and settled by the first
                assert wait_final(client, txn, headers)["status"] == "SUCCESS"
        for g in gateways:
            before, after = busy[g.pid], g.cpu_times()
            # Each one answered some of the 40 requests (about 2 ms of CPU each).
            assert (after.user + after.system) - (before.user + before.system) > 0.02, g.pid
        if stop == "sigkill":
            serve.kill()  # no shutdown code runs: the kernel tells the children
        else:
            serve.stop()
            assert serve.proc.returncode == 0
        assert _gone(gateways)
        if stop == "sigterm":  # the last of the three stopped the embedded PostgreSQL
            assert _no_postgres_left(env["UPI_DATA_DIR"])


def test_metrics_from_any_process_are_the_totals_of_all(embedded_env):
    env = {**embedded_env, "UPI_GATEWAY_PROCESSES": "2"}
    with serving(env, ("all",)) as [serve]:
        assert serve.proc is not None
        [gateway] = _started_gateways(serve.proc.pid, 1)
        metrics_dir = Path(gateway.environ()["PROMETHEUS_MULTIPROC_DIR"])
        merchant = create_merchant(env)
        n = 40
        for i in range(n):
            assert _post_payment(serve.url, merchant["api_key"], i).status_code == 202
        # Both processes took payments, neither all of them: a per-process count is not n.
        own = _per_process(metrics_dir, "counter", "upi_payments_initiated_total", {})
        assert set(own) == {serve.proc.pid, gateway.pid}
        assert sum(own.values()) == n and all(0 < v < n for v in own.values()), own
        for _ in range(10):  # fresh connections: either process answers
            text = httpx.get(f"{serve.url}/metrics", timeout=10).text
            assert _sample(text, "upi_payments_initiated_total") == n
            accepted = {"route": "/v1/payments", "status": "202", "method": "POST"}
            assert _sample(text, "upi_http_request_seconds_count", accepted) == n
            # The relay's process alone sets the backlog: one series, no pid label.
            assert "upi_outbox_backlog{pid=" not in text and "upi_outbox_backlog " in text


def test_the_rate_limit_is_shared_by_the_processes(embedded_env):
    """A burst of 10 and almost no refill: of 30 requests over 30 connections spread over
    two processes, 10 are accepted in all (each process with a bucket of its own would
    accept up to 20), the rest answered 429 with Retry-After."""
    burst, sent = 10, 30
    env = {
        **embedded_env,
        "UPI_GATEWAY_PROCESSES": "2",
        "UPI_MERCHANT_RATE_BURST": str(burst),
        "UPI_MERCHANT_RATE_PER_S": "0.0001",  # a token back every 10,000 s
        "UPI_AUTH_FAILURE_BURST": str(burst),
        "UPI_AUTH_FAILURE_RATE_PER_S": "0.0001",
        "UPI_AUDITOR_RATE_BURST": str(burst),
        "UPI_AUDITOR_RATE_PER_S": "0.0001",
    }
    with serving(env, ("all",)) as [serve]:
        assert serve.proc is not None
        [gateway] = _started_gateways(serve.proc.pid, 1)
        metrics_dir = Path(gateway.environ()["PROMETHEUS_MULTIPROC_DIR"])
        merchant = create_merchant(env)
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(
                pool.map(lambda i: _post_payment(serve.url, merchant["api_key"], i), range(sent))
            )
        codes = [a.status_code for a in answers]
        assert codes.count(202) == burst and codes.count(429) == sent - burst, codes
        for refused in (a for a in answers if a.status_code == 429):
            assert refused.json()["code"] == "rate_limited"
            assert int(refused.headers["retry-after"]) >= 1
        [(created,)] = query(env, "SELECT count(*) FROM payments")
        assert created == burst
        # Both processes answered some of the requests.
        answered = _per_process(
            metrics_dir, "histogram", "upi_http_request_seconds_count", {"route": "/v1/payments"}
        )
        assert all(answered.get(pid, 0) > 0 for pid in (serve.proc.pid, gateway.pid)), answered

        # An auditor's limit and the failed authentications of one address: one bucket each.
        auditor = orjson.loads(cli(env, "auditor", "create", "--name", "A", "--json").stdout)
        for token, refused_status in ((auditor["token"], 200), ("upi_au_wrong", 401)):
            with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
                codes = list(
                    pool.map(
                        lambda _, t=token: _get_fresh(serve.url, "/v1/audit/public-keys", t),
                        range(sent),
                    )
                )
            assert codes.count(refused_status) == burst and codes.count(429) == sent - burst, codes
        per_process = _per_process(
            metrics_dir,
            "histogram",
            "upi_http_request_seconds_count",
            {"route": "/v1/audit/public-keys", "status": "429"},
        )
        assert all(per_process.get(pid, 0) > 0 for pid in (serve.proc.pid, gateway.pid))


def _get_fresh(url: str, path: str, token: str) -> int:
    """A GET on a connection of its own (so that both processes get some)."""
    return httpx.get(
        f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).status_code

"""``UPI_GATEWAY_PROCESSES``: ``serve`` on the embedded default answers HTTP from several
processes on one port, the first running every role; the others go when it goes."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from tests.e2e.harness import create_merchant, serving, wait_final

pytestmark = pytest.mark.e2e
HANDLES = ("okhdfc", "oksbi", "okaxis", "okicici")


def _gateways(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if "--beside" in c.cmdline()]


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
        assert _gone(gateways)

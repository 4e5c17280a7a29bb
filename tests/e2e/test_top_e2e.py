"""``upi-engine top`` against a running engine (issue 17, part 4): one window of rates,
latencies and gauges as JSON, and a clear failure for an engine that is not there."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.e2e.harness import cli, create_merchant, serving

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_top_once_shows_the_engine_at_work(embedded_env):
    with serving(embedded_env, ("all",)) as (server,):
        merchant = create_merchant(embedded_env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        stop = threading.Event()

        def pay() -> None:  # a steady trickle while top watches
            with httpx.Client(base_url=server.url, timeout=10) as client:
                n = 0
                while not stop.is_set():
                    client.post(
                        "/v1/payments",
                        headers={**headers, "Idempotency-Key": f"top-{n}"},
                        json={"payer_vpa": f"t{n}@ybl", "amount_paise": 500 + n,
                              "merchant_order_id": "top"},
                    )  # fmt: skip
                    n += 1
                    time.sleep(0.05)

        payer = threading.Thread(target=pay)
        payer.start()
        try:
            time.sleep(6)  # the gauges are set every 5 s
            done = cli(embedded_env, "top", "--url", server.url, "--once", "--interval", "3",
                       "--json")  # fmt: skip
        finally:
            stop.set()
            payer.join()
        assert done.returncode == 0, done.stderr
        [engine] = json.loads(done.stdout)["engines"]
        assert engine["url"] == server.url
        assert engine["accepted_per_s"] > 0
        assert engine["accepted_p99_ms"] is not None and engine["accepted_p99_ms"] > 0
        assert sum(engine["final_per_s"].values()) > 0
        assert engine["http_5xx_per_s"] == 0
        assert "ledger" in engine["consumer_lag"] and len(engine["consumer_lag"]) >= 4
        assert engine["ledger_size"] > 0 and engine["ledger_valid"] in (True, None)
        assert engine["database_role"] == "primary"
        assert engine["deemed_payments"] == 0

        # The table, and an engine that is not there: exit 1, named as down.
        absent = f"http://127.0.0.1:{_free_port()}"
        done = cli(embedded_env, "top", "--url", server.url, "--url", absent, "--once",
                   "--interval", "0.5", "--json")  # fmt: skip
        assert done.returncode == 1
        engines = {e["url"]: e for e in json.loads(done.stdout)["engines"]}
        assert "error" in engines[absent] and "accepted_per_s" in engines[server.url]
        table = cli(embedded_env, "top", "--url", server.url, "--once", "--interval", "0.5")
        assert table.returncode == 0 and "accepted/s" in table.stdout
